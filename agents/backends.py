"""Where completion tokens come from: a local transformers model, an OpenAI-compatible server, or a script.

Every backend has one method, ``generate(prompt_ids, *, max_tokens, temperature, seed)``, which
yields the ids the model writes after the prompt (which ends in ``<|start|>assistant`` plus any
prefilled header) until ``<|return|>`` or ``<|call|>`` (included) or ``max_tokens``.

One assistant turn may hold several messages (analysis, then a call or the final answer), joined by
``<|end|><|start|>assistant``. Training labels never cover that ``<|start|>assistant`` pair (DESIGN
§3), so a model tuned from a random init never learns to write it; :class:`TransformersBackend`
therefore writes it itself after a generated ``<|end|>`` (:class:`HarmonyContinuation`). The pair
stays in the yielded ids, so the harmony parser sees a well-formed multi-message completion.
"""

from __future__ import annotations

import json
import queue
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Protocol

from ossforge.errors import UserError
from ossforge.model import tokenizer as tok

STOP_IDS = (tok.RETURN, tok.CALL)


class Backend(Protocol):
    name: str

    def generate(self, prompt_ids: list[int], *, max_tokens: int = 512, temperature: float = 0.0,
                 seed: int | None = None) -> Iterator[int]: ...


def _encode_completion(text: str) -> list[int]:
    return tok.harmony_encoding().encode(text, allowed_special="all")


def _prefill_text(prompt_ids: list[int]) -> str:
    """Text the prompt already wrote after its last ``<|start|>assistant`` (a prefilled header)."""
    ids = list(prompt_ids)
    for i in range(len(ids) - 1, 0, -1):
        if ids[i - 1] == tok.START:
            return tok.harmony_encoding().decode(ids[i + 1:])
    return ""


class ScriptedBackend:
    """Replays fixed completions: each string is what the model writes after ``<|start|>assistant``
    (stop token included), tokenized with the real o200k_harmony encoding. For deterministic tests.

    When the prompt prefills a header (tool_choice) the script's copy of that header is skipped.
    ``prompts`` records every prompt it was given.
    """

    name = "scripted"

    def __init__(self, completions: list[str], *, cycle: bool = False):
        self.completions = list(completions)
        self.cycle = cycle
        self.calls = 0
        self.prompts: list[list[int]] = []

    def generate(self, prompt_ids, *, max_tokens=512, temperature=0.0, seed=None) -> Iterator[int]:
        if not self.completions:
            raise RuntimeError("ScriptedBackend has no completions")
        if self.calls >= len(self.completions) and not self.cycle:
            raise RuntimeError(f"ScriptedBackend: all {len(self.completions)} completions used")
        text = self.completions[self.calls % len(self.completions)]
        self.calls += 1
        self.prompts.append(list(prompt_ids))
        prefill = _prefill_text(prompt_ids)
        if prefill and text.startswith(prefill):
            text = text[len(prefill):]
        yield from _encode_completion(text)[:max_tokens]


class HarmonyContinuation:
    """transformers logits processor: inside the assistant turn only ``<|start|>`` may follow a
    generated ``<|end|>``, and only the ``assistant`` role may follow that ``<|start|>``.

    Harmony allows nothing else there (tool results come only after ``<|call|>``, which ends the
    turn), so this is harmless for a pretrained gpt-oss, which writes the pair anyway. Only generated
    tokens count: ``prompt_len`` is the prompt's length (an ``<|end|>`` in the prompt is ignored).
    """

    def __init__(self, prompt_len: int):
        from ossforge.finetune.harmony import ASSISTANT

        self.prompt_len = prompt_len
        self.assistant = ASSISTANT

    def __call__(self, input_ids, scores):
        n_new = input_ids.shape[1] - self.prompt_len
        if n_new <= 0:
            return scores
        for b in range(input_ids.shape[0]):
            last = int(input_ids[b, -1])
            force = None
            if last == tok.END:
                force = tok.START
            elif last == tok.START and n_new >= 2 and int(input_ids[b, -2]) == tok.END:
                force = self.assistant
            if force is not None:
                scores[b, :] = float("-inf")
                scores[b, force] = 0.0
        return scores


class _QueueStreamer:
    """transformers streamer that hands new token ids to a queue (the first ``put`` is the prompt)."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for t in value.reshape(-1).tolist():
            self.q.put(int(t))

    def end(self):
        self.q.put(None)


class TransformersBackend:
    """A local ``GptOssForCausalLM`` (optionally with a peft adapter), MoE layers fused.

    Use :meth:`from_paths` to load from folders, or pass a model object. Greedy when
    ``temperature`` is 0, sampled otherwise; tokens are streamed as they are generated. After a
    generated ``<|end|>`` it writes ``<|start|>assistant`` and goes on (``continue_messages=False``
    turns that off and leaves every token to the model).
    """

    name = "transformers"

    def __init__(self, model, *, device: str | None = None, fuse: bool = True, continue_messages: bool = True):
        import torch

        self.continue_messages = continue_messages
        self.model = model.eval()
        self.device = device or next(model.parameters()).device
        if fuse:
            from ossforge.model import fuse_moe

            fuse_moe(self.model)
        self._torch = torch

    @classmethod
    def from_paths(cls, model_dir: str | Path | None = None, adapter_dir: str | Path | None = None, *,
                   device: str = "cpu", dtype=None) -> "TransformersBackend":
        """Load a model folder, or the base beside an adapter (``<run>/base``), plus the adapter."""
        from ossforge.model.checkpoint import load_folder, resolve_dtype

        if model_dir is None and adapter_dir is None:
            raise UserError("--model: give a model folder or an --adapter")
        if adapter_dir is not None:
            adapter_dir = Path(adapter_dir)
            if not (adapter_dir / "adapter_config.json").is_file():
                raise UserError(f"{adapter_dir}: adapter_config.json not found (not a peft adapter folder)")
            if model_dir is None:
                model_dir = _base_for_adapter(adapter_dir)
        dtype = dtype or resolve_dtype("auto", device)
        model = load_folder(model_dir, dtype=dtype, device=device)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
        return cls(model, device=device)

    def generate(self, prompt_ids, *, max_tokens=512, temperature=0.0, seed=None) -> Iterator[int]:
        torch = self._torch
        streamer = _QueueStreamer()
        input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        kwargs: dict[str, Any] = dict(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens,
            eos_token_id=list(STOP_IDS), pad_token_id=tok.PAD, streamer=streamer,
        )
        if temperature and temperature > 0:
            kwargs.update(do_sample=True, temperature=float(temperature), top_p=1.0, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        if self.continue_messages:
            kwargs["logits_processor"] = LogitsProcessorList([HarmonyContinuation(input_ids.shape[1])])

        cancel = threading.Event()  # set when the caller stops reading (timeout, closed generator)

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancelled()])
        errors: list[BaseException] = []

        def work():
            try:
                with torch.no_grad():
                    if seed is not None:
                        torch.manual_seed(seed)
                    self.model.generate(**kwargs)
            except BaseException as exc:  # surfaced in the caller's thread
                errors.append(exc)
            finally:
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while True:
                t = streamer.q.get()
                if t is None:
                    break
                yield t
                if t in STOP_IDS:
                    break
        finally:
            cancel.set()
            thread.join()
        if errors:
            raise errors[0]


def _base_for_adapter(adapter_dir: Path) -> Path:
    """The base model folder of an adapter: ``<run>/base`` beside it, else its local base path."""
    beside = adapter_dir.parent / "base"
    if (beside / "config.json").is_file():
        return beside
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if base and (Path(base) / "config.json").is_file():
        return Path(base)
    raise UserError(f"{adapter_dir}: base model not found (no {beside}/config.json and "
                    f"base_model_name_or_path={base!r} is not a local folder); pass --model DIR")


class OpenAICompatibleBackend:
    """A ``/v1/completions`` server (vLLM serving the merged model, for instance).

    Sends the raw prompt (token ids, or text with ``prompt_format="text"``), asks for special
    tokens in the output and stops on ``<|return|>`` / ``<|call|>``; the text that comes back is
    re-encoded to o200k_harmony ids for the harmony parser. A server takes no logits processor,
    so unlike :class:`TransformersBackend` the model itself must write ``<|start|>assistant`` after
    an ``<|end|>`` (gpt-oss and models tuned from it do; the server does not stop there).
    """

    name = "openai-compatible"

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 120.0,
                 prompt_format: str = "ids", stream: bool = True):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.prompt_format = prompt_format
        self.stream = stream

    def _request(self, body: dict):
        url = self.base_url + ("/completions" if self.base_url.endswith("/v1") else "/v1/completions")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise RuntimeError(f"{url}: HTTP {exc.code}: {detail}") from None
        except urllib.error.URLError as exc:
            raise RuntimeError(f"{url}: cannot connect ({exc.reason})") from None

    def generate(self, prompt_ids, *, max_tokens=512, temperature=0.0, seed=None) -> Iterator[int]:
        prompt: Any = list(prompt_ids) if self.prompt_format == "ids" else tok.harmony_encoding().decode(prompt_ids)
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                "stream": self.stream, "stop_token_ids": list(STOP_IDS), "skip_special_tokens": False,
                "include_stop_str_in_output": True}
        if seed is not None:
            body["seed"] = seed
        pieces = _PieceEncoder()
        finish = None
        stop_reason = None
        with self._request(body) as resp:
            if self.stream:
                for raw in resp:
                    line = raw.decode("utf-8").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    choice = json.loads(data)["choices"][0]
                    yield from pieces.feed(choice.get("text") or "")
                    finish = choice.get("finish_reason") or finish
                    stop_reason = choice.get("stop_reason", stop_reason)
            else:
                choice = json.loads(resp.read().decode("utf-8"))["choices"][0]
                yield from pieces.feed(choice.get("text") or "")
                finish, stop_reason = choice.get("finish_reason"), choice.get("stop_reason")
        yield from pieces.flush()
        if finish == "stop" and pieces.last not in STOP_IDS:
            # The server cut the stop token from the text: restore it so the parser sees the turn end.
            if isinstance(stop_reason, int) and stop_reason in STOP_IDS:
                yield stop_reason
            elif stop_reason is None:
                yield tok.CALL if pieces.in_tool_call() else tok.RETURN


class _PieceEncoder:
    """Re-encodes streamed text pieces, holding back a special token split across pieces."""

    def __init__(self):
        self.buf = ""
        self.last: int | None = None
        self.text = ""

    def feed(self, piece: str) -> list[int]:
        self.buf += piece
        self.text += piece
        cut = self.buf.rfind("<")
        tail = self.buf[cut:] if cut != -1 else ""
        if tail and (tail == "<" or tail.startswith("<|")) and "|>" not in tail:
            ready, self.buf = self.buf[:cut], self.buf[cut:]
        else:
            ready, self.buf = self.buf, ""
        return self._out(ready)

    def flush(self) -> list[int]:
        ready, self.buf = self.buf, ""
        return self._out(ready)

    def _out(self, text: str) -> list[int]:
        ids = _encode_completion(text) if text else []
        if ids:
            self.last = ids[-1]
        return ids

    def in_tool_call(self) -> bool:
        head = self.text.rsplit("<|start|>", 1)[-1]
        return "to=" in head.split("<|message|>", 1)[0]
