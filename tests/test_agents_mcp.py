"""MCP both ways: `ossforge mcp serve` listed and called by the mcp client; Agent runs MCP tools."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time

import pytest
from langchain_core.tools import StructuredTool

from ossforge.agents import ChatGptOss, ScriptedBackend
from ossforge.agents.loop import Agent
from ossforge.agents.mcp_client import amcp_registry, mcp_registry, risk_of, stdio_connection
from ossforge.agents.tools import ToolRegistry
from ossforge.agents.trace import Trace
from tests.conftest import REPO


def call(name: str, args) -> str:
    return (f"<|channel|>analysis<|message|>Use {name}.<|end|><|start|>assistant to=functions.{name}"
            f"<|channel|>commentary <|constrain|>json<|message|>{json.dumps(args)}<|call|>")


def final(text: str) -> str:
    return f"<|channel|>final<|message|>{text}<|return|>"


def _stdio_params(domain: str):
    from mcp import StdioServerParameters

    return StdioServerParameters(command=sys.executable, args=["-m", "ossforge", "mcp", "serve", "--domain", domain],
                                 cwd=str(REPO))


async def _with_session(params, fn):
    from mcp import ClientSession
    from mcp.client.stdio import stdio_client

    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            return await fn(session)


def test_mcp_serve_is_listed_and_called_by_the_mcp_client():
    async def check(session):
        listed = (await session.list_tools()).tools
        by_name = {t.name: t for t in listed}
        ok = await session.call_tool("dose_calc", {"mg_per_kg": 10, "weight_kg": 20})
        bad = await session.call_tool("dose_calc", {"mg_per_kg": -1, "weight_kg": 20})
        return by_name, ok, bad

    by_name, ok, bad = asyncio.run(asyncio.wait_for(_with_session(_stdio_params("medicine"), check), 60))
    assert set(by_name) == {"dose_calc", "unit_convert", "drug_lookup", "guideline_search"}
    ann = by_name["dose_calc"].annotations
    assert ann.readOnlyHint is True and ann.destructiveHint is False  # risk "low"
    assert by_name["dose_calc"].inputSchema["required"] == ["mg_per_kg", "weight_kg"]
    assert not ok.isError and ok.content[0].text == "200 mg"
    assert bad.isError and "greater than 0" in bad.content[0].text  # the registry's validation, not a crash


def test_mcp_serve_education_over_stdio():
    async def check(session):
        names = [t.name for t in (await session.list_tools()).tools]
        res = await session.call_tool("check_step", {"previous": "2x + 3 = 7", "current": "2x = 4"})
        return names, res

    names, res = asyncio.run(asyncio.wait_for(_with_session(_stdio_params("education"), check), 60))
    assert "check_step" in names and not res.isError and "correct" in res.content[0].text.lower()


def test_risk_annotations_both_ways():
    from ossforge.agents.mcp_server import tool_annotations

    reg = ToolRegistry()
    for risk in ("low", "medium", "high"):
        reg.register(StructuredTool.from_function(lambda x: x, name=f"t_{risk}", description="d"), risk=risk)
    for entry in reg:
        assert risk_of(tool_annotations(entry).model_dump()) == entry.risk
    assert risk_of(None) == "high"  # MCP's defaults: not read-only, destructive -> needs approval
    assert risk_of({"readOnlyHint": False, "destructiveHint": False}) == "medium"


def _agent(tmp_path, registry, completions, **kw):
    backend = ScriptedBackend(completions)
    return Agent(ChatGptOss(backend=backend), registry, trace=Trace(tmp_path / "t.jsonl"), **kw), backend


def test_agent_calls_a_tool_of_an_mcp_stdio_server(tmp_path):
    """The tool comes from `ossforge mcp serve` over stdio; Agent.arun and Agent.run both call it."""
    registry = mcp_registry({"medicine": stdio_connection("medicine")}, timeout_s=60)
    assert registry["dose_calc"].risk == "low" and not registry["dose_calc"].requires_approval
    script = [call("dose_calc", {"mg_per_kg": 15, "weight_kg": 18, "max_dose_mg": 1000}), final("Give 270 mg.")]
    agent, backend = _agent(tmp_path, registry, script * 2)
    events = []
    r = asyncio.run(agent.arun("dose for 18 kg?", on_event=lambda k, v: events.append((k, v))))
    assert r.stopped == "final" and r.tool_calls == 1 and r.answer == "Give 270 mg."
    assert r.messages[2].content == "270 mg" and r.messages[2].status == "success"
    assert ("tool_result", {"name": "dose_calc", "content": "270 mg", "status": "success"}) in events
    trace = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert any(x["event"] == "tool_result" and x.get("result") == "270 mg" for x in trace)
    r = agent.run("again?")  # the synchronous loop runs the async-only MCP tool too
    assert r.stopped == "final" and r.messages[2].content == "270 mg"


def test_mcp_tool_bad_args_and_approval(tmp_path):
    registry = asyncio.run(amcp_registry({"medicine": stdio_connection("medicine")}, timeout_s=60))
    registry["drug_lookup"].requires_approval = True  # as for an unannotated (destructive) MCP tool
    script = [call("dose_calc", {"mg_per_kg": 0, "weight_kg": 18}), call("drug_lookup", {"name": "paracetamol"}),
              final("Done.")]
    agent, _ = _agent(tmp_path, registry, script, approve=lambda name, args: False)
    r = asyncio.run(agent.arun("?"))
    assert r.stopped == "final"
    errors = [m.content for m in r.messages if getattr(m, "status", None) == "error"]
    assert "greater than 0" in errors[0] and errors[1] == "error: the user did not approve this tool call"


def test_async_only_tool_timeout_and_concurrent_calls(tmp_path):
    """MCP tools are async-only; the registry's timeout applies to them, and independent calls of one
    turn run concurrently in Agent.arun."""
    async def slow(seconds: float) -> str:
        """Sleep."""
        await asyncio.sleep(seconds)
        return f"slept {seconds}"

    reg = ToolRegistry()
    reg.register(StructuredTool.from_function(coroutine=slow, name="slow", description="sleep"), timeout_s=0.5)
    assert reg.run("slow", {"seconds": 0.01}) == "slept 0.01"  # sync path on its own loop
    from ossforge.agents.tools import ToolTimeout

    with pytest.raises(ToolTimeout):
        asyncio.run(reg.arun("slow", {"seconds": 2}))

    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    class TwoCalls(GenericFakeChatModel):
        def bind_tools(self, tools, **kw):
            return self

    msgs = iter([AIMessage("", tool_calls=[{"name": "slow", "args": {"seconds": 0.4}, "id": "a"},
                                           {"name": "slow", "args": {"seconds": 0.4}, "id": "b"}]),
                 AIMessage("both done")])
    agent = Agent(TwoCalls(messages=msgs), reg)
    t0 = time.perf_counter()
    r = asyncio.run(agent.arun("go"))
    took = time.perf_counter() - t0
    assert r.stopped == "final" and r.tool_calls == 2 and took < 0.75, took
    assert [m.content for m in r.messages[2:4]] == ["slept 0.4", "slept 0.4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mcp_serve_streamable_http():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ossforge", "mcp", "serve", "--domain", "medicine", "--port",
                             str(port)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        from mcp import ClientSession
        from mcp.client.streamable_http import streamable_http_client

        async def check():
            for _ in range(100):  # wait for the server to listen (bounded: ~10 s)
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                        break
                except OSError:
                    await asyncio.sleep(0.1)
            async with streamable_http_client(f"http://127.0.0.1:{port}/mcp") as (read, write, _):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    names = [t.name for t in (await session.list_tools()).tools]
                    res = await session.call_tool("unit_convert", {"value": 44, "from_unit": "lb", "to_unit": "kg"})
                    return names, res

        names, res = asyncio.run(asyncio.wait_for(check(), 60))
        assert "unit_convert" in names and res.content[0].text == "19.9581 kg"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_mcp_serve_bad_port():
    r = subprocess.run([sys.executable, "-m", "ossforge", "mcp", "serve", "--domain", "medicine", "--port", "0"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: --port:")
