"""Held-out harmony completions of every kind parse right through invoke and stream."""

from __future__ import annotations

import json
from typing import Optional

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from ossforge.agents import ChatGptOss, ScriptedBackend
from ossforge.agents.parsing import parse_completion
from ossforge.model import tokenizer as tok


@tool
def dose_calc(mg_per_kg: float, weight_kg: float, max_dose_mg: Optional[float] = None) -> str:
    """Weight-based dose in mg."""
    return f"{mg_per_kg * weight_kg:g} mg"


@tool
def unit_convert(value: float, from_unit: str, to_unit: str) -> str:
    """Convert units."""
    return "1"


CALL = '{"mg_per_kg": 10, "weight_kg": 20}'
A = "<|channel|>analysis<|message|>Weight-based dose needed.<|end|><|start|>assistant"

# name -> (completion, content, reasoning, [(tool, args)], [invalid tool names], finish_reason)
CASES = {
    "final_only": ("<|channel|>final<|message|>Hello there.<|return|>", "Hello there.", None, [], [], "stop"),
    "analysis_then_final": (
        A + "<|channel|>final<|message|>Give 200 mg.<|return|>", "Give 200 mg.", "Weight-based dose needed.", [], [], "stop"),
    "two_analysis_messages": (
        "<|channel|>analysis<|message|>one<|end|><|start|>assistant<|channel|>analysis<|message|>two<|end|>"
        "<|start|>assistant<|channel|>final<|message|>ok<|return|>", "ok", "one\n\ntwo", [], [], "stop"),
    "call_recipient_before_channel": (
        A + f" to=functions.dose_calc<|channel|>commentary <|constrain|>json<|message|>{CALL}<|call|>",
        "", "Weight-based dose needed.", [("dose_calc", {"mg_per_kg": 10, "weight_kg": 20})], [], "tool_calls"),
    "call_recipient_after_channel": (
        f"<|channel|>commentary to=functions.dose_calc <|constrain|>json<|message|>{CALL}<|call|>",
        "", None, [("dose_calc", {"mg_per_kg": 10, "weight_kg": 20})], [], "tool_calls"),
    "call_without_constrain": (
        f"<|channel|>commentary to=functions.unit_convert<|message|>" + '{"value": 22, "from_unit": "lb", "to_unit": "kg"}<|call|>',
        "", None, [("unit_convert", {"value": 22, "from_unit": "lb", "to_unit": "kg"})], [], "tool_calls"),
    "call_json_word_without_constrain": (
        f"<|channel|>commentary to=functions.dose_calc json<|message|>{CALL}<|call|>",
        "", None, [("dose_calc", {"mg_per_kg": 10, "weight_kg": 20})], [], "tool_calls"),
    "preamble_then_call": (
        "<|channel|>commentary<|message|>Let me calculate.<|end|><|start|>assistant"
        f" to=functions.dose_calc<|channel|>commentary <|constrain|>json<|message|>{CALL}<|call|>",
        "Let me calculate.", None, [("dose_calc", {"mg_per_kg": 10, "weight_kg": 20})], [], "tool_calls"),
    "invalid_json": (
        A + ' to=functions.dose_calc<|channel|>commentary <|constrain|>json<|message|>{"mg_per_kg": 10, "weight_kg": <|call|>',
        "", "Weight-based dose needed.", [], ["dose_calc"], "tool_calls"),
    "args_not_an_object": (
        " to=functions.dose_calc<|channel|>commentary <|constrain|>json<|message|>[10, 20]<|call|>",
        "", None, [], ["dose_calc"], "tool_calls"),
    "unknown_tool": (
        ' to=functions.lab_order<|channel|>commentary <|constrain|>json<|message|>{"test": "cbc"}<|call|>',
        "", None, [], ["lab_order"], "tool_calls"),
    "builtin_tool_not_bound": (
        '<|channel|>analysis to=python<|message|>print(1)<|call|>', "", None, [], ["python"], "tool_calls"),
    "call_cut_off": (
        A + ' to=functions.dose_calc<|channel|>commentary <|constrain|>json<|message|>{"mg_per_kg": 10, "weig',
        "", "Weight-based dose needed.", [], ["dose_calc"], "length"),
    "final_cut_off": ("<|channel|>final<|message|>The dose is", "The dose is", None, [], [], "length"),
    "analysis_cut_off": ("<|channel|>analysis<|message|>Let me th", "", "Let me th", [], [], "length"),
}


def _chat(completion: str, tools=(dose_calc, unit_convert), **bind):
    backend = ScriptedBackend([completion])
    llm = ChatGptOss(backend=backend)
    return (llm.bind_tools(list(tools), **bind) if tools else llm), backend


def _check(msg: AIMessage, invalid: list[dict], case):
    _, content, reasoning, calls, bad, finish = case
    assert msg.content == content
    assert msg.additional_kwargs.get("reasoning_content") == reasoning
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == calls
    assert all(c["id"].startswith("call_") for c in msg.tool_calls)
    assert [c["name"] for c in invalid] == bad
    assert all(c["error"] for c in invalid)
    assert msg.response_metadata["finish_reason"] == finish


@pytest.mark.parametrize("name", list(CASES))
def test_invoke(name):
    case = CASES[name]
    llm, _ = _chat(case[0])
    msg = llm.invoke([HumanMessage("Dose for 20 kg at 10 mg/kg?")])
    _check(msg, msg.invalid_tool_calls, case)
    assert "invalid_tool_calls" not in msg.response_metadata
    assert msg.usage_metadata["output_tokens"] == len(tok.harmony_encoding().encode(case[0], allowed_special="all"))
    assert msg.usage_metadata["input_tokens"] > 20


@pytest.mark.parametrize("name", list(CASES))
def test_stream(name):
    case = CASES[name]
    llm, _ = _chat(case[0])
    chunks = list(llm.stream([HumanMessage("Dose for 20 kg at 10 mg/kg?")]))
    # Only the last chunk carries metadata; invalid calls never appear as call chunks.
    for c in chunks[:-1]:
        assert not c.response_metadata.get("invalid_tool_calls")
        assert all(tc["name"] not in case[4] for tc in c.tool_call_chunks)
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert full.invalid_tool_calls == []
    _check(full, chunks[-1].response_metadata["invalid_tool_calls"], case)
    assert chunks[-1].usage_metadata["output_tokens"] > 0
    # tool calls arrive whole, one chunk each
    assert sum(len(c.tool_call_chunks) for c in chunks) == len(case[3])


def test_text_streams_incrementally():
    llm, _ = _chat(CASES["analysis_then_final"][0])
    chunks = list(llm.stream("hi"))
    reasoning = [c for c in chunks if c.additional_kwargs.get("reasoning_content")]
    content = [c for c in chunks if c.content]
    assert len(reasoning) >= 3 and len(content) >= 3
    assert all(not c.content for c in reasoning)  # analysis never leaks into content


def test_usage_counts_reasoning_tokens():
    msg = parse_completion(tok.harmony_encoding().encode(CASES["analysis_then_final"][0], allowed_special="all"),
                           ["dose_calc"], input_tokens=7)
    n_reasoning = len(tok.encode_text("Weight-based dose needed.")) + 1  # text + its <|end|>
    assert msg.usage_metadata["output_token_details"]["reasoning"] == n_reasoning
    assert msg.usage_metadata["input_tokens"] == 7


def test_parse_completion_matches_invoke_and_accepts_dataset_tools():
    ids = tok.harmony_encoding().encode(CASES["call_recipient_before_channel"][0], allowed_special="all")
    spec = {"name": "dose_calc", "description": "d", "parameters": {"type": "object", "properties": {}}}
    msg = parse_completion(ids, [spec])
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == CASES["call_recipient_before_channel"][3]
    assert parse_completion(ids, None).invalid_tool_calls[0]["name"] == "dose_calc"


def test_prompt_rendering_roundtrip_and_error_tool_message():
    first = CASES["call_recipient_before_channel"][0]
    llm, backend = _chat("<|channel|>final<|message|>Give 200 mg.<|return|>")
    call = parse_completion(tok.harmony_encoding().encode(first, allowed_special="all"), ["dose_calc"])
    msgs = [SystemMessage("Be brief."), HumanMessage("Dose?"), call,
            ToolMessage("weight must be > 0", tool_call_id=call.tool_calls[0]["id"], status="error")]
    llm.invoke(msgs, reasoning_effort="high")
    text = tok.decode(backend.prompts[0])
    assert "Reasoning: high" in text and "Be brief." in text
    assert ("<|start|>assistant to=functions.dose_calc<|channel|>commentary <|constrain|>json<|message|>"
            '{"mg_per_kg": 10, "weight_kg": 20}<|call|>') in text
    assert ("<|start|>functions.dose_calc to=assistant<|channel|>commentary<|message|>error: weight must be > 0<|end|>"
            in text)
    assert text.endswith("<|start|>assistant")


def test_prompt_equals_training_render():
    """The agent prompt is the training renderer's conversation, rendered for completion."""
    import openai_harmony as oh

    from ossforge.finetune.harmony import build_conversation

    llm, backend = _chat("<|channel|>final<|message|>x<|return|>")
    llm.invoke([SystemMessage("S"), HumanMessage("U")], reasoning_effort="low")
    rows = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    from ossforge.agents.schema import tool_to_function_spec

    convo = build_conversation(rows, [tool_to_function_spec(dose_calc), tool_to_function_spec(unit_convert)], "low")
    expected = tok.harmony_encoding().render_conversation_for_completion(convo, oh.Role.ASSISTANT)
    assert backend.prompts[0] == list(expected)


def test_tool_choice_named_and_any_prefill_header():
    args = '{"mg_per_kg": 1, "weight_kg": 2}'
    llm, backend = _chat(f" to=functions.dose_calc<|channel|>commentary <|constrain|>json<|message|>{args}<|call|>",
                         tool_choice="dose_calc")
    msg = llm.invoke("hi")
    assert tok.decode(backend.prompts[0]).endswith(
        "<|start|>assistant to=functions.dose_calc<|channel|>commentary <|constrain|>json<|message|>")
    assert msg.tool_calls[0]["args"] == {"mg_per_kg": 1, "weight_kg": 2}
    assert msg.usage_metadata["output_tokens"] == len(tok.encode_text(args)) + 1  # prefill not counted

    llm, backend = _chat(f" to=functions.unit_convert<|channel|>commentary <|constrain|>json<|message|>"
                         '{"value": 1, "from_unit": "g", "to_unit": "mg"}<|call|>', tool_choice="any")
    msg = llm.invoke("hi")
    assert tok.decode(backend.prompts[0]).endswith("<|start|>assistant to=functions")
    assert msg.tool_calls[0]["name"] == "unit_convert"


def test_tool_choice_none_hides_tools_and_rejects_calls():
    llm, backend = _chat(CASES["call_recipient_after_channel"][0], tool_choice="none")
    msg = llm.invoke("hi")
    assert "namespace functions" not in tok.decode(backend.prompts[0])
    assert msg.tool_calls == [] and msg.invalid_tool_calls[0]["name"] == "dose_calc"


def test_bad_tool_choice():
    with pytest.raises(ValueError, match="tool_choice"):
        ChatGptOss(backend=ScriptedBackend(["x"])).bind_tools([dose_calc], tool_choice="nope")


class Inner(BaseModel):
    unit: str = Field(description="unit")


class Order(BaseModel):
    """A medication order."""

    drug: str
    dose: Optional[float] = Field(default=None, description="dose amount")
    inner: Inner


def test_schema_normalisation_and_name_mapping():
    weird = {"name": "lab-order.v2", "description": "Order a lab test.",
             "parameters": {"type": "object", "properties": {"test": {"type": "string"}}, "required": ["test"]}}
    llm, backend = _chat(' to=functions.lab_order_v2<|channel|>commentary <|constrain|>json<|message|>{"test": "cbc"}<|call|>',
                         tools=[Order, weird])
    msg = llm.invoke("hi")
    text = tok.decode(backend.prompts[0])
    assert "type lab_order_v2 = " in text
    assert "dose?: number | null" in text  # Optional[float] rendered as a type, not `any`
    assert "unit: string" in text  # $defs inlined
    assert "any," not in text
    assert msg.tool_calls[0]["name"] == "lab-order.v2"  # mapped back to the bound name
    assert msg.tool_calls[0]["args"] == {"test": "cbc"}


def test_with_structured_output():
    completion = (' to=functions.Order<|channel|>commentary <|constrain|>json<|message|>'
                  + json.dumps({"drug": "amoxicillin", "dose": 500, "inner": {"unit": "mg"}}) + "<|call|>")
    backend = ScriptedBackend([completion, completion])
    structured = ChatGptOss(backend=backend).with_structured_output(Order)
    out = structured.invoke("order amoxicillin 500 mg")
    assert isinstance(out, Order) and out.inner.unit == "mg" and out.dose == 500
    assert tok.decode(backend.prompts[0]).endswith("to=functions.Order<|channel|>commentary <|constrain|>json<|message|>")
    raw = ChatGptOss(backend=backend).with_structured_output(Order, include_raw=True).invoke("again")
    assert raw["parsed"].drug == "amoxicillin" and raw["parsing_error"] is None


def test_timeout_cuts_generation_and_closes_backend():
    """``timeout`` bounds one completion's wall time; the backend's generator is closed."""
    import time

    class SlowScript(ScriptedBackend):
        closed = False

        def generate(self, prompt_ids, **kw):
            try:
                for t in super().generate(prompt_ids, **kw):
                    time.sleep(0.05)
                    yield t
            finally:
                SlowScript.closed = True

    backend = SlowScript(["<|channel|>final<|message|>" + "word " * 200 + "<|return|>"])
    t0 = time.monotonic()
    msg = ChatGptOss(backend=backend, timeout=0.3).invoke("hi")
    assert time.monotonic() - t0 < 3
    assert msg.response_metadata["finish_reason"] == "length" and 0 < len(msg.content) < 200
    assert SlowScript.closed


@pytest.mark.parametrize("stream", [False, True])
def test_text_stop_sequences(stream):
    llm, _ = _chat("<|channel|>final<|message|>Step 1. Step 2. END more text<|return|>", tools=())
    if stream:
        chunks = list(llm.stream("hi", stop=["END"]))
        text, finish = "".join(c.content for c in chunks), chunks[-1].response_metadata["finish_reason"]
    else:
        msg = llm.invoke("hi", stop=["END"])
        text, finish = msg.content, msg.response_metadata["finish_reason"]
    assert text == "Step 1. Step 2. " and finish == "stop"
    llm, _ = _chat("<|channel|>final<|message|>no stop here<|return|>", tools=())
    assert llm.invoke("hi", stop=["zzz"]).content == "no stop here"
