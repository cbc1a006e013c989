"""``ChatGptOss``: a langchain-core chat model that speaks harmony to a gpt-oss backend.

messages ──to_rows──► build_conversation (training's renderer) ──► prompt ids (+ prefilled header)
   ──backend.generate──► completion ids ──CompletionParser (openai-harmony)──► AIMessage / chunks
"""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator, Callable, Iterator, Literal, Sequence

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from pydantic import ConfigDict, Field, SecretStr, model_validator

from ossforge.agents.convert import call_header, render_prompt
from ossforge.agents.parsing import CompletionParser, message_from_events, usage
from ossforge.agents.schema import ToolNames, tool_to_function_spec

ToolChoice = Literal["auto", "none", "any"] | str


def normalize_tool_choice(tool_choice: Any, names: Sequence[str]) -> str:
    """``auto`` | ``none`` | ``any`` | a tool name, from the forms LangChain callers use."""
    if tool_choice in (None, "auto", False):
        return "auto"
    if tool_choice in ("any", "required", True):
        return "any"
    if tool_choice == "none":
        return "none"
    if isinstance(tool_choice, dict):
        tool_choice = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    if isinstance(tool_choice, str) and tool_choice in names:
        return tool_choice
    raise ValueError(f"tool_choice {tool_choice!r} is not auto/none/any or a bound tool ({', '.join(names)})")


class ChatGptOss(BaseChatModel):
    """gpt-oss over harmony, for LangChain/LangGraph agents.

    Example::

        llm = ChatGptOss(backend=TransformersBackend.from_paths(adapter_dir="runs/quickstart/adapter"))
        llm.bind_tools([dose_calc]).invoke("Dose for 20 kg at 15 mg/kg?")

    The analysis channel is returned in ``additional_kwargs["reasoning_content"]``, never in
    ``content``.
    """

    backend: Any = Field(default=None, exclude=True)
    """A backend from :mod:`ossforge.agents.backends` (anything with ``generate``)."""
    model_name: str = Field(default="gpt-oss", alias="model")
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    """Harmony's ``Reasoning:`` line; None keeps harmony's default (medium)."""
    temperature: float = 0.0
    max_tokens: int = 1024
    """Most tokens one completion may write (the header prefilled for tool_choice not counted)."""
    stop: list[str] | None = None
    """Text stop sequences for the answer (harmony's own stop tokens end every turn anyway)."""
    timeout: float | None = None
    """Wall-clock seconds for one completion; generation stops there (finish_reason ``length``)."""
    base_url: str | None = None
    """With no ``backend``: an OpenAI-compatible server (vLLM) to talk to, through
    :class:`~ossforge.agents.backends.OpenAICompatibleBackend` built from ``base_url``, ``model``,
    ``api_key``, ``timeout`` and ``max_retries``."""
    api_key: SecretStr | None = None
    """Bearer key for ``base_url`` (default ``$OSSFORGE_API_KEY`` / ``$OPENAI_API_KEY``)."""
    max_retries: int = 3
    """Retries with backoff on 429/5xx/connection errors for the server built from ``base_url``."""
    streaming: bool = False
    seed: int | None = None

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    @model_validator(mode="after")
    def _server_backend(self):
        if self.backend is None and self.base_url:
            from ossforge.agents.backends import OpenAICompatibleBackend

            key = self.api_key.get_secret_value() if self.api_key else None
            self.backend = OpenAICompatibleBackend(self.base_url, self.model_name, api_key=key,
                                                   timeout=self.timeout or 120.0, max_retries=self.max_retries)
        return self

    @property
    def _llm_type(self) -> str:
        return "ossforge-gpt-oss"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "reasoning_effort": self.reasoning_effort,
                "temperature": self.temperature, "max_tokens": self.max_tokens,
                "backend": getattr(self.backend, "name", type(self.backend).__name__)}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "ossforge"
        params["ls_model_name"] = kwargs.get("model", self.model_name)
        params["ls_temperature"] = kwargs.get("temperature", self.temperature)
        params["ls_max_tokens"] = kwargs.get("max_tokens", self.max_tokens)
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # ---------------------------------------------------------------- tools

    def bind_tools(self, tools: Sequence[dict[str, Any] | type | Callable | BaseTool], *,
                   tool_choice: ToolChoice | dict | bool | None = None, strict: bool | None = None,
                   parallel_tool_calls: bool | None = None, **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (langchain tools, functions, pydantic models, OpenAI dicts).

        ``tool_choice``: ``auto`` (default), ``none`` (tools not shown, any call invalid), ``any``/
        ``required`` or a tool name — emulated by prefilling the assistant's tool-call header.
        ``strict=True``: a call whose arguments do not match the tool's JSON schema becomes an
        invalid tool call (checked in the parser with jsonschema; there is no guided decoding on the
        raw harmony completion, whose analysis channel is free text).
        ``parallel_tool_calls``: harmony ends the turn at a call's ``<|call|>``, so gpt-oss makes at
        most one call per turn; ``False`` is therefore always honoured and ``True`` is refused.
        """
        if parallel_tool_calls:
            raise ValueError("parallel_tool_calls=True cannot be honoured: gpt-oss (harmony) makes one tool call "
                             "per turn (<|call|> ends it); leave it unset or False")
        specs = [tool_to_function_spec(t) for t in tools]
        choice = normalize_tool_choice(tool_choice, [s["name"] for s in specs])
        if strict:
            kwargs["strict"] = True
        return super().bind(tools=specs, tool_choice=choice, **kwargs)

    def with_structured_output(self, schema: dict | type, *, include_raw: bool = False,
                               method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
                               strict: bool | None = None, retries: int = 2, **kwargs: Any) -> Runnable:
        """Answers parsed into ``schema`` (pydantic class -> instance; JSON schema / TypedDict -> dict).

        - ``function_calling``: the schema is a tool and the call header is prefilled (no reasoning).
        - ``json_schema``: harmony's ``# Response Formats`` section in the developer message; the model
          reasons in the analysis channel first, then writes the JSON as its final answer.
        - ``json_mode``: the final answer must be one JSON object (describe it in the prompt).

        The result is validated (pydantic or jsonschema); an invalid answer goes back to the model
        with the error, at most ``retries`` times, then raises ``OutputParserException`` (or, with
        ``include_raw``, returns ``{"raw", "parsed": None, "parsing_error"}``).
        """
        from ossforge.agents.structured import structured_runnable

        if kwargs:
            raise ValueError(f"with_structured_output: unsupported arguments {sorted(kwargs)}")
        return structured_runnable(self, schema, method=method, include_raw=include_raw, strict=strict,
                                   retries=retries)

    # ---------------------------------------------------------------- generation

    def _prepare(self, messages: list[BaseMessage], kwargs: dict[str, Any]):
        tools = kwargs.get("tools") or []
        choice = kwargs.get("tool_choice") or "auto"
        names = ToolNames([t["name"] for t in tools])
        specs = [{**t, "name": names.harmony(t["name"])} for t in tools]
        effort = kwargs.get("reasoning_effort", self.reasoning_effort)
        prompt = render_prompt(messages, specs if choice != "none" else None, effort, names,
                               response_format=kwargs.get("response_format"))
        prefill: list[int] = []
        if specs and choice == "any":
            prefill = call_header(specs[0]["name"] if len(specs) == 1 else None)
        elif specs and choice not in ("auto", "none"):
            prefill = call_header(names.harmony(choice))
        parse_names = names if choice != "none" else ToolNames([])
        schemas = {t["name"]: t.get("parameters") or {} for t in tools} if kwargs.get("strict") else None
        return prompt + prefill, prefill, parse_names, schemas

    def _turn(self, messages, stop, kwargs) -> "_Turn":
        if self.backend is None:
            raise ValueError("ChatGptOss needs a backend (see ossforge.agents.backends) or a base_url")
        prompt, prefill, names, schemas = self._prepare(messages, kwargs)
        gen_kwargs: dict[str, Any] = dict(max_tokens=int(kwargs.get("max_tokens", self.max_tokens)),
                                          temperature=float(kwargs.get("temperature", self.temperature)),
                                          seed=kwargs.get("seed", self.seed))
        if kwargs.get("model"):
            gen_kwargs["model"] = kwargs["model"]  # e.g. a vLLM --lora-modules name
        return _Turn(prompt, prefill, CompletionParser(names, tool_schemas=schemas),
                     _TextStops(stop if stop is not None else self.stop), self.timeout, gen_kwargs)

    def _metadata(self, kwargs) -> dict[str, Any]:
        return {"model_name": kwargs.get("model", self.model_name),
                "backend": getattr(self.backend, "name", type(self.backend).__name__)}

    def _native_async(self) -> bool:
        return hasattr(self.backend, "agenerate")

    def _result(self, turn: "_Turn", events, kwargs) -> ChatResult:
        msg = message_from_events(events, turn.parser, self._metadata(kwargs))
        msg.usage_metadata = turn.usage()
        return ChatResult(generations=[ChatGeneration(message=msg)])

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        turn = self._turn(messages, stop, kwargs)
        tokens = self.backend.generate(turn.prompt, **turn.gen_kwargs)
        events = []
        try:
            for t in tokens:
                events += turn.feed(t)
                if turn.over:
                    break
        finally:
            if hasattr(tokens, "close"):
                tokens.close()  # stops a local generation thread early
        events += turn.finish()
        return self._result(turn, events, kwargs)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if not self._native_async():  # a third-party backend with only ``generate``
            return await super()._agenerate(messages, stop, run_manager, **kwargs)
        turn = self._turn(messages, stop, kwargs)
        tokens = self.backend.agenerate(turn.prompt, **turn.gen_kwargs)
        events = []
        try:
            async for t in tokens:
                events += turn.feed(t)
                if turn.over:
                    break
        finally:
            await tokens.aclose()
        events += turn.finish()
        return self._result(turn, events, kwargs)

    def _chunks(self, turn: "_Turn", events, state: dict) -> Iterator[ChatGenerationChunk]:
        """Reasoning and answer text as they come, each tool call once complete; invalid calls are
        kept for the last chunk's ``response_metadata["invalid_tool_calls"]`` (never call chunks)."""
        for kind, value in events:
            if kind == "content":
                chunk = AIMessageChunk(content=value)
            elif kind == "reasoning":
                chunk = AIMessageChunk(content="", additional_kwargs={"reasoning_content": value})
            elif kind == "tool_call":
                chunk = AIMessageChunk(content="", tool_call_chunks=[tool_call_chunk(
                    name=value["name"], args=json.dumps(value["args"], ensure_ascii=False),
                    id=value["id"], index=state["calls"])])
                state["calls"] += 1
            else:
                state["invalid"].append(value)
                continue
            yield ChatGenerationChunk(message=chunk)

    def _last_chunk(self, turn: "_Turn", state: dict, kwargs) -> ChatGenerationChunk:
        parser = turn.parser
        meta = {"finish_reason": parser.finish_reason, "invalid_tool_calls": state["invalid"], **self._metadata(kwargs)}
        if parser.error is not None:
            meta["harmony_error"] = parser.error
            meta["unparsed_text"] = parser.unparsed_text
        last = AIMessageChunk(content="", response_metadata=meta, usage_metadata=turn.usage(), chunk_position="last")
        return ChatGenerationChunk(message=last)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        turn = self._turn(messages, stop, kwargs)
        state = {"calls": 0, "invalid": []}
        tokens = self.backend.generate(turn.prompt, **turn.gen_kwargs)
        try:
            for t in tokens:
                for gen in self._chunks(turn, turn.feed(t), state):
                    if run_manager:
                        run_manager.on_llm_new_token(_text(gen), chunk=gen)
                    yield gen
                if turn.over:
                    break
        finally:
            if hasattr(tokens, "close"):
                tokens.close()
        yield from self._chunks(turn, turn.finish(), state)
        yield self._last_chunk(turn, state, kwargs)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        if not self._native_async():
            async for gen in super()._astream(messages, stop, run_manager, **kwargs):
                yield gen
            return
        turn = self._turn(messages, stop, kwargs)
        state = {"calls": 0, "invalid": []}
        tokens = self.backend.agenerate(turn.prompt, **turn.gen_kwargs)
        try:
            async for t in tokens:
                for gen in self._chunks(turn, turn.feed(t), state):
                    if run_manager:
                        await run_manager.on_llm_new_token(_text(gen), chunk=gen)
                    yield gen
                if turn.over:
                    break
        finally:
            await tokens.aclose()
        for gen in self._chunks(turn, turn.finish(), state):
            yield gen
        yield self._last_chunk(turn, state, kwargs)


def _text(gen: ChatGenerationChunk) -> str:
    return gen.message.content if isinstance(gen.message.content, str) else ""


class _Turn:
    """One completion being parsed: the prompt, the harmony parser, text stop strings, the deadline
    and the server's usage figures. The sync and async paths feed it the same way."""

    def __init__(self, prompt, prefill, parser: CompletionParser, stops: "_TextStops", timeout, gen_kwargs):
        self.prompt, self.n_prefill, self.parser, self.stops = prompt, len(prefill), parser, stops
        parser.feed_all(prefill)
        self.deadline = time.monotonic() + timeout if timeout else None
        self.server_usage: dict[str, int] = {}
        self.gen_kwargs = {**gen_kwargs, "usage_out": self.server_usage}
        self.over = False  # stop string found or wall-clock timeout: stop reading tokens

    def feed(self, token: int) -> list[tuple[str, Any]]:
        events = self._cut(self.parser.feed(token))
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.over = True
        return events

    def finish(self) -> list[tuple[str, Any]]:
        events = self._cut(self.parser.finish())
        rest = self.stops.flush() if self.stops else ""
        return events + ([("content", rest)] if rest else [])

    def _cut(self, events):
        if not self.stops:
            return events
        out = []
        for kind, value in events:
            if kind != "content":
                out.append((kind, value))
                continue
            text, hit = self.stops.feed(value)
            if text:
                out.append(("content", text))
            if hit:
                self.parser.end_early()
                self.over = True
                break
        return out

    def usage(self) -> dict[str, Any]:
        """Our own counts, replaced by the server's where it reported them."""
        out = usage(len(self.prompt), self.parser, prefill=self.n_prefill)
        if "prompt_tokens" in self.server_usage:
            out["input_tokens"] = self.server_usage["prompt_tokens"]
        if "completion_tokens" in self.server_usage:
            out["output_tokens"] = self.server_usage["completion_tokens"]
        out["total_tokens"] = out["input_tokens"] + out["output_tokens"]
        return out


class _TextStops:
    """Cuts streamed answer text before the first stop string, holding back possible prefixes."""

    def __init__(self, stops):
        self.stops = [s for s in (stops or []) if s]
        self.pending = ""

    def __bool__(self):
        return bool(self.stops)

    def feed(self, text: str) -> tuple[str, bool]:
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i != -1]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        keep = max(len(s) for s in self.stops) - 1
        cut = len(self.pending) - keep if keep else len(self.pending)
        out, self.pending = self.pending[:max(cut, 0)], self.pending[max(cut, 0):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
