"""Backends: an OpenAI-compatible server on 127.0.0.1, a tiny real gpt-oss model, and `ossforge chat`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from langchain_core.messages import AIMessage, HumanMessage

from ossforge.agents import ChatGptOss, OpenAICompatibleBackend, ScriptedBackend
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

    def __init__(self, text: str, strip_stop: bool = False, *, delay_s: float = 0.0, fail: Sequence[int] = (),
                 error_after: int | None = None, usage: dict | None = None, stall_after: int | None = None):
        """``delay_s`` per request; ``fail``: statuses answered (in order) before the first success;
        ``error_after``: send a vLLM-style error frame after that many pieces; ``usage``: a usage chunk."""
        self.text, self.strip_stop, self.requests = text, strip_stop, []
        self.delay_s, self.fail, self.error_after, self.usage = delay_s, list(fail), error_after, usage
        self.stall_after = stall_after  # go silent for 1.5 s after that many pieces
        self.headers: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, body))
                outer.headers.append(dict(self.headers))
                if outer.fail:
                    status = outer.fail.pop(0)
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(json.dumps({"object": "error", "message": f"busy ({status})"}).encode())
                    return
                time.sleep(outer.delay_s)
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
                        if outer.error_after is not None and i == outer.error_after:
                            err = {"error": {"message": "CUDA out of memory\nin layer 3", "type": "InternalServerError"}}
                            self.wfile.write(f"data: {json.dumps(err)}\n\n".encode())
                            return
                        if outer.stall_after is not None and i == outer.stall_after:
                            self.wfile.flush()
                            time.sleep(1.5)
                        last = i == len(pieces) - 1
                        choice = {"text": piece, "finish_reason": "stop" if last else None}
                        if last:
                            choice["stop_reason"] = stop_reason
                        self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
                    if outer.usage:
                        self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': outer.usage})}\n\n".encode())
                    self.wfile.write(b"data: [DONE]\n\n")
                else:
                    reply = {"choices": [{"text": text, "finish_reason": "stop", "stop_reason": stop_reason}]}
                    if outer.usage:
                        reply["usage"] = outer.usage
                    payload = json.dumps(reply)
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
    backend = OpenAICompatibleBackend("http://127.0.0.1:9", "m", timeout=2, max_retries=1, backoff_s=0.01)
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


# ---------------------------------------------------------------- async, retries, errors (httpx backend)

FINAL = "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Hi there.<|return|>"


@pytest.mark.parametrize("stream", [True, False])
def test_two_concurrent_ainvokes_overlap(stream):
    """The server takes 1 s per request; two ainvokes together take well under 2 s (no serialising,
    no thread executor: the loop runs both httpx requests at once)."""
    import asyncio

    import httpx  # noqa: F401  (one-time imports and the encoding load stay out of the timing)

    from ossforge.agents.convert import render_prompt

    render_prompt([HumanMessage("warm up")], None, None)
    warm = _Server(FINAL)
    asyncio.run(ChatGptOss(backend=OpenAICompatibleBackend(warm.url, "m")).ainvoke("warm up"))  # first-use imports
    warm.close()
    srv = _Server(FINAL, delay_s=1.0)
    try:
        llm = ChatGptOss(backend=OpenAICompatibleBackend(srv.url, "m", stream=stream), max_tokens=32)

        async def both():
            t0 = time.perf_counter()
            a, b = await asyncio.gather(llm.ainvoke("hi"), llm.ainvoke("hello"))
            return a, b, time.perf_counter() - t0

        a, b, took = asyncio.run(both())
        assert a.content == b.content == "Hi there." and a.additional_kwargs["reasoning_content"] == "Think."
        assert len(srv.requests) == 2 and took < 1.5, took
    finally:
        srv.close()


def test_async_path_is_native_not_an_executor(monkeypatch):
    """``_agenerate`` must not fall back to BaseChatModel's run_in_executor."""
    import asyncio

    import langchain_core.language_models.chat_models as cm

    def boom(*a, **k):
        raise AssertionError("run_in_executor used")

    monkeypatch.setattr(cm, "run_in_executor", boom)
    srv = _Server(FINAL)
    try:
        llm = ChatGptOss(backend=OpenAICompatibleBackend(srv.url, "m"))
        msg = asyncio.run(llm.ainvoke("hi"))
        chunks = asyncio.run(_collect(llm.astream("hi")))
        assert msg.content == "Hi there." and "".join(c.content for c in chunks) == "Hi there."
        assert chunks[-1].response_metadata["finish_reason"] == "stop"
    finally:
        srv.close()


async def _collect(aiter):
    return [c async for c in aiter]


@pytest.mark.parametrize("use_async", [False, True])
def test_retries_429_and_503_then_success(use_async):
    import asyncio

    srv = _Server(FINAL, fail=[429, 503])
    try:
        llm = ChatGptOss(backend=OpenAICompatibleBackend(srv.url, "m", max_retries=2, backoff_s=0.01))
        msg = asyncio.run(llm.ainvoke("hi")) if use_async else llm.invoke("hi")
        assert msg.content == "Hi there." and len(srv.requests) == 3
    finally:
        srv.close()


def test_retries_give_up_with_one_line_error():
    srv = _Server(FINAL, fail=[503, 503, 503])
    try:
        llm = ChatGptOss(backend=OpenAICompatibleBackend(srv.url, "m", max_retries=1, backoff_s=0.01))
        with pytest.raises(RuntimeError, match=r"HTTP 503: .*busy \(503\).*after 2 attempts") as err:
            llm.invoke("hi")
        assert "\n" not in str(err.value) and len(srv.requests) == 2
    finally:
        srv.close()


def test_client_errors_are_not_retried_and_hint_at_the_key():
    srv = _Server(FINAL, fail=[401])
    try:
        with pytest.raises(RuntimeError, match=r"HTTP 401 \(pass --api-key or set OPENAI_API_KEY\)"):
            ChatGptOss(backend=OpenAICompatibleBackend(srv.url, "m", backoff_s=0.01)).invoke("hi")
        assert len(srv.requests) == 1
    finally:
        srv.close()


def test_error_frame_mid_stream_is_one_line(monkeypatch):
    import asyncio

    srv = _Server(FINAL, error_after=3)
    try:
        llm = ChatGptOss(backend=OpenAICompatibleBackend(srv.url, "m"))
        for call in (lambda: llm.invoke("hi"), lambda: asyncio.run(llm.ainvoke("hi"))):
            with pytest.raises(RuntimeError, match="server error: CUDA out of memory in layer 3") as err:
                call()
            assert "\n" not in str(err.value)
    finally:
        srv.close()


def test_silent_server_mid_stream_hits_the_timeout():
    import asyncio

    import httpx  # noqa: F401  (imported before timing, like the encoding below)

    tok.harmony_encoding()
    srv = _Server(FINAL, stall_after=2)
    try:
        llm = ChatGptOss(backend=OpenAICompatibleBackend(srv.url, "m", timeout=0.5, max_retries=0))
        for call in (lambda: llm.invoke("hi"), lambda: asyncio.run(llm.ainvoke("hi"))):
            t0 = time.perf_counter()
            with pytest.raises(RuntimeError, match=r"no complete reply within 0.5 s \(timeout\)"):
                call()
            assert time.perf_counter() - t0 < 1.4
    finally:
        srv.close()


def test_whole_request_timeout():
    srv = _Server(FINAL, delay_s=3.0)
    try:
        t0 = time.perf_counter()
        with pytest.raises(RuntimeError, match="timeout"):
            ChatGptOss(backend=OpenAICompatibleBackend(srv.url, "m", timeout=0.5, max_retries=0)).invoke("hi")
        assert time.perf_counter() - t0 < 2.5
    finally:
        srv.close()


@pytest.mark.parametrize("stream", [True, False])
def test_server_usage_api_key_and_per_call_model(monkeypatch, stream):
    import asyncio

    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    srv = _Server(FINAL, usage={"prompt_tokens": 77, "completion_tokens": 5, "total_tokens": 82})
    try:
        llm = ChatGptOss(backend=OpenAICompatibleBackend(srv.url, "base", stream=stream))
        msg = llm.invoke("hi", model="med")  # a vLLM --lora-modules name picks the adapter
        assert msg.usage_metadata["input_tokens"] == 77 and msg.usage_metadata["output_tokens"] == 5
        assert msg.usage_metadata["total_tokens"] == 82 and msg.response_metadata["model_name"] == "med"
        assert srv.requests[-1][1]["model"] == "med" and srv.headers[-1]["Authorization"] == "Bearer sk-env"
        asyncio.run(llm.ainvoke("hi"))
        assert srv.requests[-1][1]["model"] == "base"
        if stream:
            assert srv.requests[-1][1]["stream_options"] == {"include_usage": True}
        # base_url + api_key on ChatGptOss itself build the same backend
        llm2 = ChatGptOss(base_url=srv.url, model="med", api_key="sk-arg", max_retries=0)
        assert llm2.invoke("hi").content == "Hi there."
        assert srv.requests[-1][1]["model"] == "med" and srv.headers[-1]["Authorization"] == "Bearer sk-arg"
    finally:
        srv.close()


def test_chat_cli_server_error_is_one_line():
    srv = _Server(FINAL, error_after=2)
    try:
        r = run_cli("chat", "--domain", "medicine", "--server", srv.url, "--server-model", "med",
                    "--api-key", "sk-x", input="hi\n")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().startswith("error: ") and "server error: CUDA out of memory" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert srv.requests[0][1]["model"] == "med" and srv.headers[0]["Authorization"] == "Bearer sk-x"
    finally:
        srv.close()


def test_scripted_backend_async_concurrency():
    import asyncio

    backend = ScriptedBackend(["<|channel|>final<|message|>ok<|return|>"], cycle=True, delay_s=0.5)
    llm = ChatGptOss(backend=backend)

    async def many():
        t0 = time.perf_counter()
        out = await asyncio.gather(*(llm.ainvoke(f"q{i}") for i in range(4)))
        return out, time.perf_counter() - t0

    out, took = asyncio.run(many())
    assert [m.content for m in out] == ["ok"] * 4 and took < 1.5


def test_transformers_backend_serialises_concurrent_generations(tiny_model):
    """Two threads and two coroutines generating on one model get the same ids as one call alone."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from ossforge.agents.convert import render_prompt

    backend = TransformersBackend(tiny_model)
    prompt = render_prompt([HumanMessage("hi")], None, "low")
    alone = list(backend.generate(prompt, max_tokens=4, temperature=1.0, seed=5))
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: list(backend.generate(prompt, max_tokens=4, temperature=1.0, seed=5)), range(2)))
    assert outs == [alone, alone]

    async def two():
        async def one():
            return [t async for t in backend.agenerate(prompt, max_tokens=4, temperature=1.0, seed=5)]
        return await asyncio.gather(one(), one())

    assert asyncio.run(two()) == [alone, alone]
    assert not backend._lock.locked()
