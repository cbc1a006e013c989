"""``ChatGptOss.with_structured_output``: three ways to get an answer in a schema, validated, retried.

- ``function_calling``: the schema is bound as a tool and its call header is prefilled, so the model
  writes the arguments at once (no analysis first).
- ``json_schema``: harmony's ``# Response Formats`` section in the developer message; the model
  reasons in the analysis channel, then writes the JSON in the final channel.
- ``json_mode``: the final answer must be one JSON object; the prompt says what it should hold.

Every answer is validated (pydantic for a pydantic class, jsonschema otherwise). An invalid one
goes back to the model with the validation error, at most ``retries`` times.
"""

from __future__ import annotations

import json
import re
from typing import Any

from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.runnables import Runnable, RunnableLambda
from pydantic import BaseModel, ValidationError

from ossforge.agents.parsing import schema_error
from ossforge.agents.schema import tool_to_function_spec

METHODS = ("function_calling", "json_schema", "json_mode")
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def structured_runnable(llm, schema, *, method: str, include_raw: bool, strict: bool | None,
                        retries: int) -> Runnable:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if schema is None and method != "json_mode":
        raise ValueError(f"method={method!r} needs a schema (only json_mode works without one)")
    spec = tool_to_function_spec(schema) if schema is not None else None
    pydantic_cls = schema if isinstance(schema, type) and issubclass(schema, BaseModel) else None
    if method == "function_calling":
        bound = llm.bind_tools([schema], tool_choice=spec["name"], strict=strict)
    elif method == "json_schema":
        bound = llm.bind(response_format={"name": spec["name"], "description": spec["description"],
                                          "schema": spec["parameters"]})
    else:
        bound = llm.bind(response_format={"type": "json_object"})

    def parse(msg: AIMessage) -> Any:
        if method == "function_calling":
            if msg.tool_calls:
                value = msg.tool_calls[0]["args"]
            elif msg.invalid_tool_calls:
                raise OutputParserException(msg.invalid_tool_calls[0].get("error") or "invalid tool call",
                                            llm_output=msg.invalid_tool_calls[0].get("args") or "")
            else:
                raise OutputParserException("the model answered without calling the schema's tool",
                                            llm_output=_text(msg))
        else:
            value = _json_of(_text(msg))
        return _validate(value, pydantic_cls, spec)

    def retry_messages(messages, msg, exc) -> list[BaseMessage]:
        wrote = getattr(exc, "llm_output", None) or _text(msg)
        return [*messages, AIMessage(content=wrote),
                HumanMessage(f"That answer is not valid: {exc}. Reply again with only the corrected JSON.")]

    def finish(msg, value, error):
        if include_raw:
            return {"raw": msg, "parsed": value, "parsing_error": error}
        if error is not None:
            raise error
        return value

    def run(input_, config=None):
        messages = llm._convert_input(input_).to_messages()
        for attempt in range(retries + 1):
            msg = bound.invoke(messages, config)
            try:
                return finish(msg, parse(msg), None)
            except OutputParserException as exc:
                if attempt == retries:
                    return finish(msg, None, exc)
                messages = retry_messages(messages, msg, exc)

    async def arun(input_, config=None):
        messages = llm._convert_input(input_).to_messages()
        for attempt in range(retries + 1):
            msg = await bound.ainvoke(messages, config)
            try:
                return finish(msg, parse(msg), None)
            except OutputParserException as exc:
                if attempt == retries:
                    return finish(msg, None, exc)
                messages = retry_messages(messages, msg, exc)

    return RunnableLambda(run, afunc=arun, name=f"structured_output[{method}]")


def _text(msg: AIMessage) -> str:
    return msg.content if isinstance(msg.content, str) else json.dumps(msg.content)


def _json_of(text: str) -> Any:
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise OutputParserException(f"the answer is not valid JSON ({exc.msg} at char {exc.pos})",
                                    llm_output=text) from None


def _validate(value: Any, pydantic_cls, spec: dict | None) -> Any:
    if pydantic_cls is not None:
        try:
            return pydantic_cls.model_validate(value)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())
            raise OutputParserException(f"schema mismatch: {problems}", llm_output=json.dumps(value)) from None
    if not isinstance(value, dict):
        raise OutputParserException("the answer must be a JSON object", llm_output=json.dumps(value))
    if spec is not None:
        problem = schema_error(value, spec["parameters"])
        if problem:
            raise OutputParserException(f"schema mismatch: {problem}", llm_output=json.dumps(value))
    return value
