"""Backends: an OpenAI-compatible server on 127.0.0.1, a tiny real gpt-oss model, and `ossforge chat`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from langchain_core.messages import AIMessage, HumanMessage

from ossforge.agents import ChatGptOss, OpenAICompatibleBackend
from ossforge.agents.backends import TransformersBackend
from ossforge.model import tokenizer as tok
from tests.conftest import REPO


def run_cli(*args, input: str, cwd=None, env=None):
    """``ossforge ARGS`` in a subprocess with ``input`` piped to stdin."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "ossforge", *args], cwd=cwd or REPO, env=full_env, input=input,
                          capture_output=True, text=True, timeout=300)

CALL = ('<|channel|>analysis<|message|>Use the calculator.<|end|><|start|>assistant to=functions.dose_calc'
        '<|channel|>commentary <|constrain|>json<|message|>{"mg_per_kg": 10, "weight_kg": 20}<|call|>')


class _Server:
    """A tiny /v1/completions server that replies with fixed text, like vLLM with skip_special_tokens=False."""

    def __init__(self, text: str, strip_stop: bool = False):
        self.text, self.strip_stop, self.requests = text, strip_stop, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, body))
                text = outer.text
                stop_reason = None
                if outer.strip_stop:
                    stop_reason = tok.CALL if text.endswith("<|call|>") else tok.RETURN
                    text = text.rsplit("<|", 1)[0]
                if body.get("stream"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    pieces = [text[i:i + 7] for i in range(0, len(text), 7)]  # splits special tokens too
                    for i, piece in enumerate(pieces):
                        last = i == len(pieces) - 1
                        choice = {"text": piece, "finish_reason": "stop" if last else None}
                        if last:
                            choice["stop_reason"] = stop_reason
                        self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
                    self.wfile.write(b"data: [DONE]\n\n")
                else:
                    payload = json.dumps({"choices": [{"text": text, "finish_reason": "stop", "stop_reason": stop_reason}]})
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(payload.encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(request):
    s = _Server(*getattr(request, "param", (CALL,)))
    yield s
    s.close()


def _dose_tool():
    from ossforge.agents.domains.medicine import registry

    return registry().tools()


@pytest.mark.parametrize("server", [(CALL,), (CALL, True)], indirect=True, ids=["stop-in-text", "stop-stripped"])
@pytest.mark.parametrize("stream", [True, False])
def test_openai_compatible_backend(server, stream):
    backend = OpenAICompatibleBackend(server.url, "gpt-oss-med", stream=stream)
    llm = ChatGptOss(backend=backend, max_tokens=64).bind_tools(_dose_tool())
    msg = llm.invoke([HumanMessage("dose for 20 kg at 10 mg/kg")])
    assert msg.tool_calls[0]["name"] == "dose_calc" and msg.tool_calls[0]["args"] == {"mg_per_kg": 10, "weight_kg": 20}
    assert msg.additional_kwargs["reasoning_content"] == "Use the calculator."
    assert msg.response_metadata["finish_reason"] == "tool_calls"
    path, body = server.requests[0]
    assert path == "/v1/completions" and body["model"] == "gpt-oss-med" and body["max_tokens"] == 64
    assert body["prompt"][-2:] == [tok.START, 173781]  # raw token ids ending in <|start|>assistant
    assert body["stop_token_ids"] == [tok.RETURN, tok.CALL] and body["skip_special_tokens"] is False


@pytest.mark.parametrize("server", [("<|channel|>final<|message|>Hello.<|return|>",)], indirect=True)
def test_openai_compatible_text_prompt_and_stream(server):
    backend = OpenAICompatibleBackend(server.url + "/v1", "m", prompt_format="text")
    chunks = list(ChatGptOss(backend=backend).stream("hi"))
    assert "".join(c.content for c in chunks) == "Hello."
    assert chunks[-1].response_metadata["finish_reason"] == "stop"
    assert server.requests[0][1]["prompt"].endswith("<|start|>assistant")


def test_openai_compatible_unreachable():
    backend = OpenAICompatibleBackend("http://127.0.0.1:9", "m", timeout=2)
    with pytest.raises(RuntimeError, match="cannot connect"):
        ChatGptOss(backend=backend).invoke("hi")


def test_tiny_real_model_through_transformers_backend(tiny_model):
    llm = ChatGptOss(backend=TransformersBackend(tiny_model), max_tokens=6).bind_tools(_dose_tool())
    msg = llm.invoke([HumanMessage("Dose for 20 kg at 10 mg/kg?")])
    assert isinstance(msg, AIMessage) and isinstance(msg.content, str)
    assert msg.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")
    assert 1 <= msg.usage_metadata["output_tokens"] <= 6 and msg.usage_metadata["input_tokens"] > 100
    # streaming through the same backend ends with exactly one metadata chunk
    chunks = list(llm.stream([HumanMessage("hi")]))
    assert chunks[-1].response_metadata["finish_reason"] in ("stop", "length", "tool_calls")


def test_transformers_backend_greedy_is_deterministic(tiny_model):
    from ossforge.agents.convert import render_prompt

    backend = TransformersBackend(tiny_model)
    prompt = render_prompt([HumanMessage("hi")], None, "low")
    a = list(backend.generate(prompt, max_tokens=5))
    b = list(backend.generate(prompt, max_tokens=5))
    assert a == b and len(a) == 5 or (a == b and a[-1] in (tok.RETURN, tok.CALL))
    s1, s2 = (list(backend.generate(prompt, max_tokens=5, temperature=1.0, seed=3)) for _ in range(2))
    assert s1 == s2  # sampling is reproducible from the seed
    early = backend.generate(prompt, max_tokens=400)
    assert next(early) == a[0]
    early.close()  # stops the generation thread instead of running 400 steps


class _Steer:
    """Adds +1000 to one logit per generated step of a real tiny model: the script of what a tuned
    model writes. Like a model tuned on DESIGN §3 labels, the script never contains the
    ``<|start|>assistant`` pair after ``<|end|>`` (``None`` there: no bias at those two steps)."""

    def __init__(self, model, script: list[int | None]):
        self.script, self.step = script, -1

        def pre(module, args, kwargs):
            ids = kwargs.get("input_ids")
            self.step = 0 if ids is not None and ids.shape[1] > 1 else self.step + 1  # prefill = step 0

        def post(module, args, out):
            t = self.script[self.step] if self.step < len(self.script) else None
            if t is not None:
                out = out.clone()
                out[:, -1, t] += 1000.0
            return out

        self.handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
                        model.lm_head.register_forward_hook(post)]

    def remove(self):
        for h in self.handles:
            h.remove()


def _ids(text: str) -> list[int]:
    return tok.harmony_encoding().encode(text, allowed_special="all")


def test_transformers_backend_writes_start_assistant_after_end(tiny_model):
    """A model that never learned ``<|start|>assistant`` still yields a well-formed two-message turn:
    the backend writes the pair after ``<|end|>``, and ChatGptOss (what ``ossforge chat`` uses) parses
    the reasoning and the final answer. Without the continuation the same model derails."""
    from ossforge.finetune.harmony import ASSISTANT

    analysis = _ids("<|channel|>analysis<|message|>Think.<|end|>")
    final = _ids("<|channel|>final<|message|>Hello there.<|return|>")
    steer = _Steer(tiny_model, analysis + [None, None] + final)
    try:
        backend = TransformersBackend(tiny_model)
        from ossforge.agents.convert import render_prompt

        prompt = render_prompt([HumanMessage("hi")], None, "low")
        out = list(backend.generate(prompt, max_tokens=40))
        assert out == analysis + [tok.START, ASSISTANT] + final  # the inserted pair is kept in the stream
        msg = ChatGptOss(backend=backend, max_tokens=40).invoke([HumanMessage("hi")])
        assert msg.content == "Hello there." and msg.additional_kwargs["reasoning_content"] == "Think."
        assert msg.response_metadata["finish_reason"] == "stop"
        assert msg.usage_metadata["output_tokens"] == len(out)

        backend.continue_messages = False  # the model alone: after <|end|> it goes on with <|channel|>
        raw = list(backend.generate(prompt, max_tokens=40))
        assert raw[len(analysis):len(analysis) + 2] != [tok.START, ASSISTANT]
        msg = ChatGptOss(backend=backend, max_tokens=40).invoke([HumanMessage("hi")])
        assert msg.content != "Hello there."
    finally:
        steer.remove()


def test_harmony_continuation_ignores_the_prompt():
    import torch

    from ossforge.agents.backends import HarmonyContinuation
    from ossforge.finetune.harmony import ASSISTANT

    proc = HarmonyContinuation(prompt_len=2)
    scores = torch.zeros(3, 201088)
    ids = torch.tensor([[1, tok.END, 5, tok.END],          # generated ... <|end|> -> <|start|>
                        [1, 2, tok.END, tok.START],        # generated <|end|><|start|> -> assistant
                        [tok.END, tok.START, 7, 8]])       # nothing to force
    out = proc(ids, scores.clone())
    assert out[0].argmax() == tok.START and torch.isinf(out[0]).sum() == 201087
    assert out[1].argmax() == ASSISTANT and torch.isinf(out[1]).sum() == 201087
    assert torch.equal(out[2], scores[2])
    assert torch.equal(HarmonyContinuation(prompt_len=4)(ids, scores.clone()), scores)  # nothing generated yet
    # <|end|> in the prompt, <|start|> generated (eval's "another call?" probe): the model decides
    assert torch.equal(HarmonyContinuation(prompt_len=3)(ids[1:2], scores[:1].clone()), scores[:1])


def test_chat_cli_scripted(tmp_path):
    script = tmp_path / "script.json"
    script.write_text(json.dumps([CALL, "<|channel|>analysis<|message|>SECRET<|end|><|start|>assistant"
                                        "<|channel|>final<|message|>Give 200 mg.<|return|>"]))
    trace = tmp_path / "t.jsonl"
    r = run_cli("chat", "--domain", "medicine", "--scripted", str(script), "--trace", str(trace),
                input="Dose for 20 kg at 10 mg/kg? my email is a@b.co\n")
    assert r.returncode == 0, r.stderr
    assert '[tool] dose_calc({"mg_per_kg": 10, "weight_kg": 20})' in r.stdout
    assert "[tool result] dose_calc: 200 mg" in r.stdout
    assert "assistant> Give 200 mg." in r.stdout and "not a diagnosis" in r.stdout
    assert "SECRET" not in r.stdout and "Use the calculator" not in r.stdout
    assert "a@b.co" not in trace.read_text()
    r = run_cli("chat", "--domain", "medicine", "--scripted", str(script), "--show-reasoning", "--trace", str(trace),
                input="dose?\n")
    assert "[reasoning] Use the calculator." in r.stdout and "[reasoning] SECRET" in r.stdout


def test_chat_cli_user_errors(tmp_path):
    r = run_cli("chat", "--domain", "medicine", cwd=tmp_path, input="hi\n")
    assert r.returncode == 2 and "make quickstart" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("[\n  'x'\n]")
    r = run_cli("chat", "--domain", "medicine", "--scripted", str(bad), input="hi\n")
    assert r.returncode == 2 and r.stderr.startswith(f"error: {bad}:2:")
    r = run_cli("chat", "--domain", "education", "--adapter", str(tmp_path / "nope"), input="hi\n")
    assert r.returncode == 2 and "nope" in r.stderr


@pytest.mark.slow
def test_chat_cli_tiny_model_with_adapter(tmp_path, tiny_model):
    """A run folder as training leaves it (base/ + peft adapter/) chats from piped stdin."""
    from peft import LoraConfig, get_peft_model

    from ossforge.model.checkpoint import save_base

    save_base(tiny_model, tmp_path / "run" / "base")
    peft_model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "run" / "adapter")
    r = run_cli("chat", "--domain", "education", "--adapter", str(tmp_path / "run" / "adapter"), "--max-tokens", "3",
                "--trace", str(tmp_path / "t.jsonl"), input="What is 37 * 4?\n", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    events = [json.loads(x)["event"] for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert events[0] == "user" and events[-1] == "answer" and "model" in events
