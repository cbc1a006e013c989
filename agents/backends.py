"""Where completion tokens come from: a local transformers model, an OpenAI-compatible server, or a script.

Every backend has ``generate(prompt_ids, *, max_tokens, temperature, seed, model=None, usage_out=None)``,
which yields the ids the model writes after the prompt (which ends in ``<|start|>assistant`` plus any
prefilled header) until ``<|return|>`` or ``<|call|>`` (included) or ``max_tokens``, and its async
twin ``agenerate`` (an async iterator of the same ids). ``model`` names the served model or adapter
for this call (servers only); ``usage_out``, when given, receives the server's own token counts
(``prompt_tokens``, ``completion_tokens``) if it reports them.

One assistant turn may hold several messages (analysis, then a call or the final answer), joined by
``<|end|><|start|>assistant``. Training labels never cover that ``<|start|>assistant`` pair, so a model
tuned from a random init never learns to write it; :class:`TransformersBackend` therefore writes it
itself after a generated ``<|end|>`` (:class:`HarmonyContinuation`). The pair stays in the yielded
ids, so the harmony parser sees a well-formed multi-message completion.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Protocol

from ossforge.errors import UserError
from ossforge.model import tokenizer as tok

STOP_IDS = (tok.RETURN, tok.CALL)


class Backend(Protocol):
    name: str

    def generate(self, prompt_ids: list[int], *, max_tokens: int = 512, temperature: float = 0.0,
                 seed: int | None = None, model: str | None = None,
                 usage_out: dict | None = None) -> Iterator[int]: ...

    def agenerate(self, prompt_ids: list[int], *, max_tokens: int = 512, temperature: float = 0.0,
                  seed: int | None = None, model: str | None = None,
                  usage_out: dict | None = None) -> AsyncIterator[int]: ...


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

    def __init__(self, completions: list[str], *, cycle: bool = False, delay_s: float = 0.0):
        self.completions = list(completions)
        self.cycle = cycle
        self.delay_s = delay_s  # per completion, to test concurrency (sleeps without blocking in agenerate)
        self.calls = 0
        self.prompts: list[list[int]] = []
        self.models: list[str | None] = []  # the per-call model= of each completion

    def _next(self, prompt_ids, model) -> str:
        if not self.completions:
            raise RuntimeError("ScriptedBackend has no completions")
        if self.calls >= len(self.completions) and not self.cycle:
            raise RuntimeError(f"ScriptedBackend: all {len(self.completions)} completions used")
        text = self.completions[self.calls % len(self.completions)]
        self.calls += 1
        self.prompts.append(list(prompt_ids))
        self.models.append(model)
        prefill = _prefill_text(prompt_ids)
        if prefill and text.startswith(prefill):
            text = text[len(prefill):]
        return text

    def generate(self, prompt_ids, *, max_tokens=512, temperature=0.0, seed=None, model=None,
                 usage_out=None) -> Iterator[int]:
        text = self._next(prompt_ids, model)
        if self.delay_s:
            time.sleep(self.delay_s)
        yield from _encode_completion(text)[:max_tokens]

    async def agenerate(self, prompt_ids, *, max_tokens=512, temperature=0.0, seed=None, model=None,
                        usage_out=None) -> AsyncIterator[int]:
        text = self._next(prompt_ids, model)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        for t in _encode_completion(text)[:max_tokens]:
            yield t


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


class _TokenStreamer:
    """transformers streamer that hands each new token id to ``put`` (the first ``put`` is the prompt),
    and ``None`` at the end."""

    def __init__(self, put: Callable[[int | None], None]):
        self._put = put
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for t in value.reshape(-1).tolist():
            self._put(int(t))

    def end(self):
        self._put(None)


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
        self._lock = threading.Lock()

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

    def _start(self, prompt_ids, max_tokens, temperature, seed, put) -> tuple[threading.Thread, threading.Event, list]:
        """Start one generation in a thread; tokens go to ``put``. Generations on this model run one at
        a time (``self._lock``, held by the thread): transformers' ``generate`` and the seeded RNG are
        not safe to share between concurrent calls on one model."""
        torch = self._torch
        streamer = _TokenStreamer(put)
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
                with self._lock, torch.no_grad():
                    if not cancel.is_set():
                        if seed is not None:
                            torch.manual_seed(seed)
                        self.model.generate(**kwargs)
            except BaseException as exc:  # surfaced in the caller
                errors.append(exc)
            finally:
                streamer.end()

        thread = threading.Thread(target=work, daemon=True, name="ossforge-generate")
        thread.start()
        return thread, cancel, errors

    def generate(self, prompt_ids, *, max_tokens=512, temperature=0.0, seed=None, model=None,
                 usage_out=None) -> Iterator[int]:
        q: queue.Queue = queue.Queue()
        thread, cancel, errors = self._start(prompt_ids, max_tokens, temperature, seed, q.put)
        try:
            while True:
                t = q.get()
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

    async def agenerate(self, prompt_ids, *, max_tokens=512, temperature=0.0, seed=None, model=None,
                        usage_out=None) -> AsyncIterator[int]:
        """The same generation, its tokens handed to the event loop as they come (the loop is never
        blocked: the model runs in its own thread, as in :meth:`generate`)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def put(t):
            try:
                loop.call_soon_threadsafe(q.put_nowait, t)
            except RuntimeError:  # the loop is gone (the caller stopped reading): nothing to hand on
                pass

        thread, cancel, errors = self._start(prompt_ids, max_tokens, temperature, seed, put)
        try:
            while True:
                t = await q.get()
                if t is None:
                    break
                yield t
                if t in STOP_IDS:
                    break
        finally:
            cancel.set()  # the thread stops at its next step and releases the lock
            while thread.is_alive():  # wait without blocking the loop
                await asyncio.sleep(0.005)
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


class BackendError(RuntimeError):
    """A server or model failure, worded as one line for the user (``ossforge chat`` prints it as is)."""


class _Transient(Exception):
    """A failure worth retrying (429, 5xx, connection reset) before any token arrived."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
API_KEY_ENV = ("OSSFORGE_API_KEY", "OPENAI_API_KEY")


def api_key_from_env() -> str | None:
    """The first of ``OSSFORGE_API_KEY`` / ``OPENAI_API_KEY`` that is set."""
    for var in API_KEY_ENV:
        if os.environ.get(var):
            return os.environ[var]
    return None


class OpenAICompatibleBackend:
    """A ``/v1/completions`` server (vLLM serving gpt-oss, merged or base + LoRA adapters), over httpx.

    Sends the raw prompt (token ids, or text with ``prompt_format="text"``), asks for special
    tokens in the output and stops on ``<|return|>`` / ``<|call|>``; the text that comes back is
    re-encoded to o200k_harmony ids for the harmony parser. A server takes no logits processor,
    so unlike :class:`TransformersBackend` the model itself must write ``<|start|>assistant`` after
    an ``<|end|>`` (gpt-oss and models tuned from it do; the server does not stop there).

    - ``model``: the name the server knows (``--served-model-name``, or a ``--lora-modules`` name);
      a per-call ``model=`` overrides it, so one server can serve several adapters.
    - ``api_key``: sent as ``Authorization: Bearer``; default ``$OSSFORGE_API_KEY`` or ``$OPENAI_API_KEY``.
    - ``max_retries``: retries with exponential backoff and jitter (tenacity) on HTTP 408/429/5xx and
      connection errors, only before the first token arrived (tokens already handed on are never
      replayed).
    - ``timeout``: seconds for the whole request, connection to last token; then :class:`BackendError`.

    Failures raise :class:`BackendError` with one line (URL, status, the server's message), also
    when the server sends an error frame in the middle of a stream.
    """

    name = "openai-compatible"

    def __init__(self, base_url: str, model: str = "gpt-oss", *, api_key: str | None = None,
                 timeout: float = 120.0, max_retries: int = 3, backoff_s: float = 0.5,
                 prompt_format: str = "ids", stream: bool = True):
        if prompt_format not in ("ids", "text"):
            raise ValueError(f"prompt_format must be 'ids' or 'text', not {prompt_format!r}")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + ("/completions" if self.base_url.endswith("/v1") else "/v1/completions")
        self.model = model
        self.api_key = api_key if api_key is not None else api_key_from_env()
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.prompt_format = prompt_format
        self.stream = stream
        self._client = None  # one pooled sync client; async clients are made per call (bound to a loop)
        self._ssl = None  # one TLS context for all clients (building it is the slow part of a new client)

    # ------------------------------------------------------------ request pieces

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream, application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _body(self, prompt_ids, max_tokens, temperature, seed, model) -> dict[str, Any]:
        prompt: Any = list(prompt_ids) if self.prompt_format == "ids" else tok.harmony_encoding().decode(prompt_ids)
        body = {"model": model or self.model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": temperature, "stream": self.stream, "stop_token_ids": list(STOP_IDS),
                "skip_special_tokens": False, "include_stop_str_in_output": True}
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if seed is not None:
            body["seed"] = seed
        return body

    def _client_kwargs(self) -> dict[str, Any]:
        import httpx

        if self._ssl is None:
            self._ssl = httpx.create_ssl_context()
        return {"timeout": httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0)), "verify": self._ssl}

    def _retrying(self, kind):
        import tenacity

        return kind(stop=tenacity.stop_after_attempt(self.max_retries + 1),
                    wait=tenacity.wait_random_exponential(multiplier=self.backoff_s, max=10.0),
                    retry=tenacity.retry_if_exception_type(_Transient), reraise=True)

    def _status_error(self, status: int, detail: str) -> Exception:
        detail = " ".join(detail.split())[:300]
        if status in RETRY_STATUS:
            return _Transient(f"{self.url}: HTTP {status}: {detail}")
        hint = " (pass --api-key or set OPENAI_API_KEY)" if status in (401, 403) else ""
        return BackendError(f"{self.url}: HTTP {status}{hint}: {detail}")

    def _connect_error(self, exc) -> _Transient:
        return _Transient(f"{self.url}: cannot connect ({type(exc).__name__}: {_first_line(exc)})")

    def _mid_reply(self, exc) -> BackendError:
        import httpx

        if isinstance(exc, httpx.TimeoutException):
            return self._timed_out()
        return BackendError(f"{self.url}: connection lost mid-reply ({type(exc).__name__})")

    def _timed_out(self) -> BackendError:
        return BackendError(f"{self.url}: no complete reply within {self.timeout:g} s (timeout)")

    # ------------------------------------------------------------ sync

    def generate(self, prompt_ids, *, max_tokens=512, temperature=0.0, seed=None, model=None,
                 usage_out: dict | None = None) -> Iterator[int]:
        import httpx
        import tenacity

        body = self._body(prompt_ids, max_tokens, temperature, seed, model)
        deadline = time.monotonic() + self.timeout
        if self._client is None:
            self._client = httpx.Client(**self._client_kwargs())

        def open_response():
            try:
                resp = self._client.send(self._client.build_request("POST", self.url, json=body,
                                                                    headers=self._headers()), stream=True)
            except (httpx.TransportError,) as exc:
                if isinstance(exc, httpx.TimeoutException) and time.monotonic() > deadline:
                    raise self._timed_out() from None
                raise self._connect_error(exc) from None
            if resp.status_code != 200:
                detail = resp.read().decode(errors="replace")
                resp.close()
                raise self._status_error(resp.status_code, detail)
            return resp

        try:
            resp = self._retrying(tenacity.Retrying)(open_response)
        except _Transient as exc:
            raise BackendError(f"{exc.message} (after {self.max_retries + 1} attempts)") from None
        reply = _Reply(self.url, usage_out)
        try:
            for line in self._lines(resp, deadline):
                yield from reply.line(line)
                if reply.done:
                    break
        except httpx.TransportError as exc:
            raise self._mid_reply(exc) from None
        finally:
            resp.close()
        yield from reply.end()

    def _lines(self, resp, deadline) -> Iterator[str]:
        for line in resp.iter_lines():
            if time.monotonic() > deadline:
                raise self._timed_out()
            yield line

    # ------------------------------------------------------------ async

    async def agenerate(self, prompt_ids, *, max_tokens=512, temperature=0.0, seed=None, model=None,
                        usage_out: dict | None = None) -> AsyncIterator[int]:
        import httpx
        import tenacity

        body = self._body(prompt_ids, max_tokens, temperature, seed, model)
        deadline = time.monotonic() + self.timeout
        async with httpx.AsyncClient(**self._client_kwargs()) as client:
            async def open_response():
                try:
                    resp = await client.send(client.build_request("POST", self.url, json=body,
                                                                  headers=self._headers()), stream=True)
                except httpx.TransportError as exc:
                    if isinstance(exc, httpx.TimeoutException) and time.monotonic() > deadline:
                        raise self._timed_out() from None
                    raise self._connect_error(exc) from None
                if resp.status_code != 200:
                    detail = (await resp.aread()).decode(errors="replace")
                    await resp.aclose()
                    raise self._status_error(resp.status_code, detail)
                return resp

            try:
                resp = await self._retrying(tenacity.AsyncRetrying)(open_response)
            except _Transient as exc:
                raise BackendError(f"{exc.message} (after {self.max_retries + 1} attempts)") from None
            reply = _Reply(self.url, usage_out)
            try:
                async for line in resp.aiter_lines():
                    if time.monotonic() > deadline:
                        raise self._timed_out()
                    for t in reply.line(line):
                        yield t
                    if reply.done:
                        break
            except httpx.TransportError as exc:
                raise self._mid_reply(exc) from None
            finally:
                await resp.aclose()
            for t in reply.end():
                yield t

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class _Reply:
    """One server reply, streamed (``data:`` lines) or whole (a JSON body over several lines)."""

    def __init__(self, url: str, usage_out: dict | None):
        self.url, self.usage_out = url, usage_out
        self.pieces = _PieceEncoder()
        self.finish = self.stop_reason = None
        self.done = False
        self._body: list[str] = []  # a non-streamed reply's JSON lines
        self._streamed = False

    def line(self, line: str) -> list[int]:
        line = line.strip()
        if not line:
            return []
        if line.startswith("data:"):
            self._streamed = True
            data = line[5:].strip()
            if data == "[DONE]":
                self.done = True
                return []
            return self._obj(self._json(data))
        if not self._streamed:
            self._body.append(line)
        return []

    def end(self) -> list[int]:
        out = []
        if self._body:
            out += self._obj(self._json("\n".join(self._body)))
        out += self.pieces.flush()
        if self.finish == "stop" and self.pieces.last not in STOP_IDS:
            # The server cut the stop token from the text: restore it so the parser sees the turn end.
            if isinstance(self.stop_reason, int) and self.stop_reason in STOP_IDS:
                out.append(self.stop_reason)
            elif self.stop_reason is None:
                out.append(tok.CALL if self.pieces.in_tool_call() else tok.RETURN)
        return out

    def _json(self, data: str) -> Any:
        try:
            return json.loads(data)
        except json.JSONDecodeError:
            raise BackendError(f"{self.url}: the server sent something that is not JSON: {data[:120]!r}") from None

    def _obj(self, obj: Any) -> list[int]:
        if not isinstance(obj, dict):
            raise BackendError(f"{self.url}: unexpected reply {str(obj)[:120]!r}")
        if "error" in obj or obj.get("object") == "error":
            err = obj.get("error", obj)
            msg = err.get("message", err) if isinstance(err, dict) else err
            raise BackendError(f"{self.url}: server error: {' '.join(str(msg).split())[:300]}")
        if isinstance(obj.get("usage"), dict) and self.usage_out is not None:
            self.usage_out.update({k: v for k, v in obj["usage"].items() if isinstance(v, int)})
        choices = obj.get("choices")
        if choices is None:
            raise BackendError(f"{self.url}: reply has no 'choices': {json.dumps(obj)[:120]}")
        if not choices:  # the usage-only chunk of stream_options.include_usage
            return []
        choice = choices[0]
        self.finish = choice.get("finish_reason") or self.finish
        self.stop_reason = choice.get("stop_reason", self.stop_reason)
        return self.pieces.feed(choice.get("text") or "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:200]

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
