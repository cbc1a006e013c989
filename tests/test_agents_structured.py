"""with_structured_output (function_calling / json_schema / json_mode) and bind_tools options."""

from __future__ import annotations

import asyncio
import json

import pytest
from langchain_core.exceptions import OutputParserException
from pydantic import BaseModel, Field

from ossforge.agents import ChatGptOss, ScriptedBackend
from ossforge.model import tokenizer as tok


class Dose(BaseModel):
    """A dose answer."""

    drug: str
    mg: float = Field(gt=0)


def final(text: str, reasoning: str = "Work it out.") -> str:
    return f"<|channel|>analysis<|message|>{reasoning}<|end|><|start|>assistant<|channel|>final<|message|>{text}<|return|>"


def call(name: str, args: str) -> str:
    return f" to=functions.{name}<|channel|>commentary <|constrain|>json<|message|>{args}<|call|>"


def test_json_schema_puts_response_format_in_developer_message_and_reasons_first():
    backend = ScriptedBackend([final('{"drug": "paracetamol", "mg": 270}')])
    out = ChatGptOss(backend=backend).with_structured_output(Dose, method="json_schema").invoke("dose?")
    assert out == Dose(drug="paracetamol", mg=270)
    prompt = tok.decode(backend.prompts[0])
    dev = prompt.split("<|start|>developer<|message|>", 1)[1].split("<|end|>", 1)[0]
    assert "# Response Formats" in dev and "## Dose" in dev and "// A dose answer." in dev
    assert '"mg": {"type": "number", "exclusiveMinimum": 0}' in dev or '"exclusiveMinimum": 0' in dev
    assert prompt.endswith("<|start|>assistant")  # nothing prefilled: the model writes analysis first


def test_json_schema_retries_invalid_json_then_succeeds():
    backend = ScriptedBackend([final("mg is 270"), final('{"drug": "paracetamol", "mg": -5}'),
                               final('```json\n{"drug": "paracetamol", "mg": 270}\n```')])
    out = ChatGptOss(backend=backend).with_structured_output(Dose, method="json_schema", retries=2).invoke("dose?")
    assert out.mg == 270 and backend.calls == 3
    second, third = tok.decode(backend.prompts[1]), tok.decode(backend.prompts[2])
    assert "not valid JSON" in second and "mg is 270" in second
    assert "schema mismatch: mg: Input should be greater than 0" in third


def test_retry_is_bounded_and_include_raw_reports_the_error():
    backend = ScriptedBackend([final("nope")], cycle=True)
    llm = ChatGptOss(backend=backend)
    with pytest.raises(OutputParserException, match="not valid JSON"):
        llm.with_structured_output(Dose, method="json_schema", retries=1).invoke("dose?")
    assert backend.calls == 2
    raw = llm.with_structured_output(Dose, method="json_schema", retries=0, include_raw=True).invoke("dose?")
    assert raw["parsed"] is None and isinstance(raw["parsing_error"], OutputParserException)
    assert raw["raw"].content == "nope" and backend.calls == 3


def test_json_mode_and_dict_schema_async():
    schema = {"title": "answer", "description": "An answer.", "type": "object",
              "properties": {"value": {"type": "integer"}}, "required": ["value"]}
    backend = ScriptedBackend([final('{"value": "x"}'), final('{"value": 4}'), final('{"anything": [1, 2]}')])
    llm = ChatGptOss(backend=backend)
    out = asyncio.run(llm.with_structured_output(schema, method="json_schema").ainvoke("2+2?"))
    assert out == {"value": 4} and "value: 'x' is not of type 'integer'" in tok.decode(backend.prompts[1])
    free = llm.with_structured_output(None, method="json_mode").invoke("give JSON")
    assert free == {"anything": [1, 2]}
    assert "one JSON object and nothing else" in tok.decode(backend.prompts[2])


def test_function_calling_prefills_the_call_and_validates():
    backend = ScriptedBackend([call("Dose", '{"drug": "x", "mg": 0}'), call("Dose", '{"drug": "x", "mg": 5}')])
    out = ChatGptOss(backend=backend).with_structured_output(Dose, method="function_calling", strict=True).invoke("?")
    assert out == Dose(drug="x", mg=5)
    assert tok.decode(backend.prompts[0]).endswith("to=functions.Dose<|channel|>commentary <|constrain|>json<|message|>")
    assert "arguments do not match the tool's schema" in tok.decode(backend.prompts[1])


def test_bind_tools_strict_validates_arguments_in_the_parser():
    from ossforge.agents.domains.medicine import registry

    tools = registry().tools()
    text = call("dose_calc", '{"mg_per_kg": "ten", "weight_kg": 20}')
    loose = ChatGptOss(backend=ScriptedBackend([text])).bind_tools(tools).invoke("?")
    strict = ChatGptOss(backend=ScriptedBackend([text])).bind_tools(tools, strict=True).invoke("?")
    assert loose.tool_calls and loose.tool_calls[0]["args"]["mg_per_kg"] == "ten"
    assert not strict.tool_calls and "mg_per_kg: 'ten' is not of type 'number'" in strict.invalid_tool_calls[0]["error"]


def test_parallel_tool_calls():
    llm = ChatGptOss(backend=ScriptedBackend([final("hi")]))
    assert llm.bind_tools([Dose], parallel_tool_calls=False).invoke("?").content == "hi"
    with pytest.raises(ValueError, match="one tool call per turn"):
        llm.bind_tools([Dose], parallel_tool_calls=True)


def test_per_call_model_reaches_the_backend():
    backend = ScriptedBackend([final("a"), final("b")])
    llm = ChatGptOss(backend=backend, model="base")
    assert llm.invoke("?", model="med").response_metadata["model_name"] == "med"
    llm.invoke("?")
    assert backend.models == ["med", None]  # None: the backend's own default


def test_bad_method():
    with pytest.raises(ValueError, match="method must be one of"):
        ChatGptOss(backend=ScriptedBackend([])).with_structured_output(Dose, method="xml")
