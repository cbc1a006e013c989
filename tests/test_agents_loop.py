"""The agent loop with scripted completions: tool call -> result -> final, retries, limits, approval."""

from __future__ import annotations

import json
import time

from langchain_core.tools import StructuredTool, ToolException

from ossforge.agents import ChatGptOss, ScriptedBackend
from ossforge.agents.loop import Agent, AgentLimits, build_domain_agent
from ossforge.agents.tools import ToolRegistry
from ossforge.agents.trace import Trace
from ossforge.model import tokenizer as tok


def call(name: str, args) -> str:
    text = args if isinstance(args, str) else json.dumps(args)
    return (f"<|channel|>analysis<|message|>I should call {name}.<|end|><|start|>assistant"
            f" to=functions.{name}<|channel|>commentary <|constrain|>json<|message|>{text}<|call|>")


def final(text: str) -> str:
    return f"<|channel|>analysis<|message|>SECRET-REASONING<|end|><|start|>assistant<|channel|>final<|message|>{text}<|return|>"


def medicine(completions, tmp_path=None, **kw):
    backend = ScriptedBackend(completions)
    trace = Trace(tmp_path / "trace.jsonl" if tmp_path else None)
    return build_domain_agent("medicine", ChatGptOss(backend=backend), trace=trace, **kw), backend, trace


def test_tool_call_result_final(tmp_path):
    agent, backend, trace = medicine([call("dose_calc", {"mg_per_kg": 15, "weight_kg": 18, "max_dose_mg": 1000}),
                                      final("Give 270 mg.")], tmp_path)
    events = []
    r = agent.run("Paracetamol dose for 18 kg?", on_event=lambda k, v: events.append((k, v)))
    assert r.stopped == "final" and r.model_calls == 2 and r.tool_calls == 1
    assert r.answer.startswith("Give 270 mg.") and r.answer.endswith(agent.disclaimer)
    assert "SECRET" not in r.answer
    assert ("tool_result", {"name": "dose_calc", "content": "270 mg", "status": "success"}) in events
    # the tool result went back to the model in harmony form
    assert "<|start|>functions.dose_calc to=assistant<|channel|>commentary<|message|>270 mg<|end|>" in tok.decode(backend.prompts[1])
    lines = [json.loads(x) for x in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [x["event"] for x in lines] == ["user", "model", "tool_result", "model", "answer"]


def test_streaming_loop_same_result():
    agent, _, _ = medicine([call("unit_convert", {"value": 44, "from_unit": "lb", "to_unit": "kg"}), final("About 20 kg.")],
                           stream=True)
    content = []
    r = agent.run("44 lb in kg?", on_event=lambda k, v: content.append(v) if k == "content" else None)
    assert r.stopped == "final" and "".join(content) == r.answer
    assert r.messages[-2].content == "19.9581 kg"


def test_malformed_json_is_sent_back_and_retried():
    agent, backend, _ = medicine([call("dose_calc", '{"mg_per_kg": 10, "weight_kg": '),
                                  call("dose_calc", {"mg_per_kg": 10, "weight_kg": 20}), final("200 mg.")])
    r = agent.run("dose?")
    assert r.stopped == "final" and r.tool_calls == 1 and r.model_calls == 3
    retry_prompt = tok.decode(backend.prompts[1])
    assert "error: arguments are not valid JSON" in retry_prompt
    assert '{"mg_per_kg": 10, "weight_kg": <|call|>' in retry_prompt  # the model sees what it wrote


def test_unknown_tool_then_recovers():
    agent, backend, _ = medicine([call("prescribe", {"drug": "x"}), final("I cannot prescribe.")])
    r = agent.run("prescribe x")
    assert r.stopped == "final" and r.tool_calls == 0
    assert "unknown tool 'functions.prescribe'" in tok.decode(backend.prompts[1])
    assert "available tools: dose_calc, unit_convert, drug_lookup, guideline_search" in tok.decode(backend.prompts[1])


def test_retry_limit():
    bad = call("dose_calc", "{not json")
    agent, _, _ = medicine([bad, bad, bad], limits=AgentLimits(max_retries=2))
    r = agent.run("dose?")
    assert r.stopped == "retry_limit" and r.model_calls == 3
    assert "malformed tool calls" in r.answer


def test_model_call_limit():
    agent, _, _ = medicine([call("drug_lookup", {"name": "ibuprofen"})] * 3, limits=AgentLimits(max_model_calls=3))
    r = agent.run("ibuprofen?")
    assert r.stopped == "model_call_limit" and r.model_calls == 3 and r.tool_calls == 3


def test_tool_call_limit():
    agent, _, _ = medicine([call("drug_lookup", {"name": "ibuprofen"})] * 3, limits=AgentLimits(max_tool_calls=2))
    r = agent.run("ibuprofen?")
    assert r.stopped == "tool_call_limit" and r.tool_calls == 2


def test_tool_errors_become_error_tool_messages():
    agent, backend, _ = medicine([call("drug_lookup", {"name": "unobtainium"}), call("dose_calc", {"mg_per_kg": -1, "weight_kg": 20}),
                                  final("Sorry.")])
    r = agent.run("x")
    errors = [m for m in r.messages if m.type == "tool" and m.status == "error"]
    assert len(errors) == 2
    assert "not in the local drug table" in errors[0].content
    assert "ValidationError" in errors[1].content and "mg_per_kg" in errors[1].content


def _tool_msgs(result):
    return [m for m in result.messages if m.type == "tool"]


def _registry_with(fn, **policy):
    reg = ToolRegistry()
    reg.register(StructuredTool.from_function(fn), **policy)
    return reg


def test_tool_timeout():
    def slow_lookup(q: str) -> str:
        """Slow."""
        time.sleep(2)
        return "late"

    backend = ScriptedBackend([call("slow_lookup", {"q": "a"}), final("gave up")])
    agent = Agent(ChatGptOss(backend=backend), _registry_with(slow_lookup, timeout_s=0.2))
    t0 = time.monotonic()
    r = agent.run("go")
    assert time.monotonic() - t0 < 1.5
    (msg,) = _tool_msgs(r)
    assert "timed out after 0.2 s" in msg.content and msg.status == "error"


def test_wall_time_limit():
    def slowish(q: str) -> str:
        """Slowish."""
        time.sleep(0.3)
        return "ok"

    backend = ScriptedBackend([call("slowish", {"q": "a"})] * 5)
    agent = Agent(ChatGptOss(backend=backend), _registry_with(slowish), limits=AgentLimits(max_wall_s=0.5))
    r = agent.run("go")
    assert r.stopped == "time_limit" and r.model_calls < 5


def test_approval_required_for_risky_tool():
    ran = []

    def send_referral(clinic: str) -> str:
        """Send a referral."""
        ran.append(clinic)
        return "sent"

    for approve, expected in ((lambda n, a: False, []), (lambda n, a: a["clinic"] == "cardio", ["cardio"])):
        ran.clear()
        backend = ScriptedBackend([call("send_referral", {"clinic": "cardio"}), final("done")])
        agent = Agent(ChatGptOss(backend=backend), _registry_with(send_referral, risk="high"), approve=approve)
        r = agent.run("refer")
        assert ran == expected
        assert ("did not approve" in _tool_msgs(r)[0].content) == (not expected)


def test_tool_exception_from_tool():
    def flaky(q: str) -> str:
        """Fails."""
        raise ToolException("backend down")

    backend = ScriptedBackend([call("flaky", {"q": "a"}), final("sorry")])
    r = Agent(ChatGptOss(backend=backend), _registry_with(flaky)).run("go")
    assert _tool_msgs(r)[0].content == "error: ToolException: backend down"


def test_red_flag_escalation_and_pii_redacted_trace(tmp_path):
    agent, _, trace = medicine([final("Please seek care.")], tmp_path)
    r = agent.run("My dad (DOB 04/05/1950, MRN 88812345, jim@example.org, 555-201-7788) has crushing chest pain")
    assert r.answer.startswith("This may be an emergency (chest pain)")
    text = (tmp_path / "trace.jsonl").read_text()
    for secret in ("04/05/1950", "88812345", "jim@example.org", "555-201-7788"):
        assert secret not in text
    assert "[DOB]" in text and "[RECORD]" in text and "[EMAIL]" in text and "[PHONE]" in text
    assert "SECRET-REASONING" in text  # trace keeps reasoning for developers; the answer never does
    assert "SECRET" not in r.answer


def test_education_agent_hint_flow():
    backend = ScriptedBackend([call("give_hint", {"problem": "3x + 4 = 19", "level": 2}), final("Try subtracting first.")])
    agent = build_domain_agent("education", ChatGptOss(backend=backend))
    r = agent.run("I'm stuck on 3x + 4 = 19")
    hint = r.messages[3].content
    assert hint.startswith("hint 2/3") and "subtract 4" in hint and "5" not in hint
    assert r.answer == "Try subtracting first."  # no medical disclaimer here


def test_history_carries_to_next_turn():
    agent, backend, _ = medicine([final("Hi."), final("Still here.")])
    r1 = agent.run("hello")
    agent.run("again", history=[m for m in r1.messages if m.type != "system"])
    prompt = tok.decode(backend.prompts[1])
    assert "hello" in prompt and "Hi." in prompt
    assert "SECRET-REASONING" not in prompt  # harmony drops earlier turns' analysis


def test_works_inside_langchain_create_agent():
    """ChatGptOss is a plain BaseChatModel: LangChain's create_agent (the successor of LangGraph's
    deprecated create_react_agent) drives it unchanged."""
    from langchain.agents import create_agent

    backend = ScriptedBackend([call("dose_calc", {"mg_per_kg": 10, "weight_kg": 20}), final("Give 200 mg.")])
    graph = create_agent(ChatGptOss(backend=backend), load_tools("medicine"))
    out = graph.invoke({"messages": [("user", "dose for 20 kg at 10 mg/kg")]})
    assert [m.type for m in out["messages"]] == ["human", "ai", "tool", "ai"]
    assert out["messages"][2].content == "200 mg" and out["messages"][-1].content == "Give 200 mg."


def load_tools(domain):
    from ossforge.agents.domains import load

    return load(domain).registry().tools()


def test_compact_agent_prompt_equals_training_rows():
    """With compact=True the agent's first prompt is exactly a shipped training row's prefix."""
    import openai_harmony as oh
    import pytest

    from ossforge.finetune.harmony import build_conversation
    from tests.conftest import REPO

    for domain in ("medicine", "education"):
        path = REPO / "data" / domain / "heldout.jsonl"
        if not path.is_file():
            pytest.skip(f"{path} not shipped")
        row = json.loads(path.read_text().splitlines()[0])
        system, user = row["messages"][0], row["messages"][1]
        assert system["role"] == "system" and user["role"] == "user"
        backend = ScriptedBackend([final("ok")])
        llm = ChatGptOss(backend=backend, reasoning_effort=row.get("reasoning_effort"))
        build_domain_agent(domain, llm, compact=True).run(user["content"])
        convo = build_conversation([system, user], row["tools"], row.get("reasoning_effort"))
        expected = tok.harmony_encoding().render_conversation_for_completion(convo, oh.Role.ASSISTANT)
        assert backend.prompts[0] == list(expected)


def test_loop_reads_invalid_calls_when_invoke_streams():
    """streaming=True makes LangChain's invoke use _stream; malformed calls are still retried."""
    backend = ScriptedBackend([call("dose_calc", "{oops"), final("ok")])
    agent = build_domain_agent("medicine", ChatGptOss(backend=backend, streaming=True))
    r = agent.run("dose?")
    assert r.stopped == "final" and r.model_calls == 2
    assert "arguments are not valid JSON" in tok.decode(backend.prompts[1])
