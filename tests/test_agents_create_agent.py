"""Domain assistants through langchain's create_agent, guard rails as middleware."""

from __future__ import annotations

import asyncio
import json

from langchain_core.tools import StructuredTool

from ossforge.agents import ChatGptOss, ScriptedBackend
from ossforge.agents.langchain_agent import create_domain_agent
from ossforge.agents.tools import ToolRegistry
from ossforge.model import tokenizer as tok


def call(name: str, args) -> str:
    text = args if isinstance(args, str) else json.dumps(args)
    return (f"<|channel|>analysis<|message|>Call {name}.<|end|><|start|>assistant"
            f" to=functions.{name}<|channel|>commentary <|constrain|>json<|message|>{text}<|call|>")


def final(text: str) -> str:
    return f"<|channel|>final<|message|>{text}<|return|>"


def _ask(graph, text, use_async=False):
    state = {"messages": [{"role": "user", "content": text}]}
    return asyncio.run(graph.ainvoke(state)) if use_async else graph.invoke(state)


def test_medicine_assistant_tools_notice_and_disclaimer():
    from ossforge.agents.domains import medicine

    backend = ScriptedBackend([call("dose_calc", {"mg_per_kg": 15, "weight_kg": 18, "max_dose_mg": 1000}),
                               final("Give 270 mg.")] * 2)
    graph = create_domain_agent("medicine", ChatGptOss(backend=backend))
    for use_async in (False, True):
        out = _ask(graph, "Dose for 18 kg? She also has chest pain.", use_async)
        msgs = out["messages"]
        assert [m.type for m in msgs] == ["human", "ai", "tool", "ai"]
        assert msgs[2].content == "270 mg"
        answer = msgs[-1].content
        assert answer.startswith(medicine.ESCALATION.split("{")[0]) and "Give 270 mg." in answer
        assert answer.endswith(medicine.DISCLAIMER)
    assert medicine.SYSTEM_PROMPT[:40] in tok.decode(backend.prompts[0])


def test_bad_arguments_go_back_to_the_model_through_the_registry():
    backend = ScriptedBackend([call("dose_calc", {"mg_per_kg": -1, "weight_kg": 18}),
                               call("dose_calc", {"mg_per_kg": 1, "weight_kg": 18}), final("18 mg.")])
    out = _ask(create_domain_agent("medicine", ChatGptOss(backend=backend)), "dose?")
    tools = [m for m in out["messages"] if m.type == "tool"]
    assert tools[0].status == "error" and "greater than 0" in tools[0].content
    assert tools[1].content == "18 mg" and "greater than 0" in tok.decode(backend.prompts[1])


def test_approval_and_timeout_come_from_the_registry():
    import time

    def wipe(record: str) -> str:
        """Delete a record."""
        return "deleted"

    def slow(x: int) -> str:
        """Slow."""
        time.sleep(2)
        return "late"

    reg = ToolRegistry()
    reg.register(StructuredTool.from_function(wipe), risk="high")
    reg.register(StructuredTool.from_function(slow), timeout_s=0.2)
    asked = []
    backend = ScriptedBackend([call("wipe", {"record": "a"}), call("slow", {"x": 1}), final("Done.")])
    graph = create_domain_agent("medicine", ChatGptOss(backend=backend), registry=reg,
                                approve=lambda name, args: asked.append(name) or False)
    out = _ask(graph, "wipe a")
    tools = [m for m in out["messages"] if m.type == "tool"]
    assert asked == ["wipe"] and tools[0].content == "error: the user did not approve this tool call"
    assert "ToolTimeout" in tools[1].content


def test_model_call_limit_ends_the_run():
    backend = ScriptedBackend([call("dose_calc", {"mg_per_kg": 1, "weight_kg": 2})], cycle=True)
    out = _ask(create_domain_agent("medicine", ChatGptOss(backend=backend), max_model_calls=2), "loop")
    assert backend.calls == 2 and sum(m.type == "tool" for m in out["messages"]) == 2
