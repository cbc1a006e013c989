"""``ChatGptOss``: a langchain-core chat model that speaks harmony to a gpt-oss backend.

messages ──to_rows──► build_conversation (training's renderer) ──► prompt ids (+ prefilled header)
   ──backend.generate──► completion ids ──CompletionParser (openai-harmony)──► AIMessage / chunks
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterator, Literal, Sequence

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from pydantic import ConfigDict, Field, SecretStr

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
    max_retries: int = 0
    api_key: SecretStr | None = None
    streaming: bool = False
    seed: int | None = None

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

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
                   tool_choice: ToolChoice | dict | bool | None = None, **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (langchain tools, functions, pydantic models, OpenAI dicts).

        ``tool_choice``: ``auto`` (default), ``none`` (tools not shown, any call invalid), ``any``/
        ``required`` or a tool name — emulated by prefilling the assistant's tool-call header.
        """
        specs = [tool_to_function_spec(t) for t in tools]
        choice = normalize_tool_choice(tool_choice, [s["name"] for s in specs])
        return super().bind(tools=specs, tool_choice=choice, **kwargs)

    # ---------------------------------------------------------------- generation

    def _prepare(self, messages: list[BaseMessage], kwargs: dict[str, Any]):
        tools = kwargs.get("tools") or []
        choice = kwargs.get("tool_choice") or "auto"
        names = ToolNames([t["name"] for t in tools])
        specs = [{**t, "name": names.harmony(t["name"])} for t in tools]
        effort = kwargs.get("reasoning_effort", self.reasoning_effort)
        prompt = render_prompt(messages, specs if choice != "none" else None, effort, names)
        prefill: list[int] = []
        if specs and choice == "any":
            prefill = call_header(specs[0]["name"] if len(specs) == 1 else None)
        elif specs and choice not in ("auto", "none"):
            prefill = call_header(names.harmony(choice))
        parse_names = names if choice != "none" else ToolNames([])
        return prompt + prefill, prefill, parse_names

    def _events(self, messages, stop, kwargs, parser_out: list) -> Iterator[tuple[str, Any]]:
        """Parser events; with ``stop`` strings, answer text ends before the first one found."""
        stops = _TextStops(stop if stop is not None else self.stop)
        for kind, value in self._harmony_events(messages, kwargs, parser_out):
            if kind != "content" or not stops:
                yield kind, value
                continue
            text, hit = stops.feed(value)
            if text:
                yield "content", text
            if hit:
                parser_out[0].end_early()
                return
        rest = stops.flush()
        if rest:
            yield "content", rest

    def _harmony_events(self, messages, kwargs, parser_out: list) -> Iterator[tuple[str, Any]]:
        if self.backend is None:
            raise ValueError("ChatGptOss needs a backend (see ossforge.agents.backends)")
        prompt, prefill, names = self._prepare(messages, kwargs)
        parser = CompletionParser(names)
        parser_out.extend([parser, len(prompt), len(prefill)])
        parser.feed_all(prefill)
        deadline = time.monotonic() + self.timeout if self.timeout else None
        tokens = self.backend.generate(prompt, max_tokens=int(kwargs.get("max_tokens", self.max_tokens)),
                                       temperature=float(kwargs.get("temperature", self.temperature)),
                                       seed=kwargs.get("seed", self.seed))
        try:
            for t in tokens:
                yield from parser.feed(t)
                if deadline is not None and time.monotonic() > deadline:
                    break
        finally:
            if hasattr(tokens, "close"):
                tokens.close()  # stops a local generation thread early
        yield from parser.finish()

    def _metadata(self, kwargs) -> dict[str, Any]:
        return {"model_name": kwargs.get("model", self.model_name),
                "backend": getattr(self.backend, "name", type(self.backend).__name__)}

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        state: list = []
        events = list(self._events(messages, stop, kwargs, state))
        parser, n_prompt, n_prefill = state
        msg = message_from_events(events, parser, self._metadata(kwargs))
        msg.usage_metadata = usage(n_prompt, parser, prefill=n_prefill)
        return ChatResult(generations=[ChatGeneration(message=msg)])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        """Reasoning and answer text as they come, each tool call once complete; invalid calls in
        the last chunk's ``response_metadata["invalid_tool_calls"]`` (never as call chunks)."""
        state: list = []
        invalid = []
        n_calls = 0
        for kind, value in self._events(messages, stop, kwargs, state):
            if kind == "content":
                chunk = AIMessageChunk(content=value)
            elif kind == "reasoning":
                chunk = AIMessageChunk(content="", additional_kwargs={"reasoning_content": value})
            elif kind == "tool_call":
                chunk = AIMessageChunk(content="", tool_call_chunks=[tool_call_chunk(
                    name=value["name"], args=json.dumps(value["args"], ensure_ascii=False),
                    id=value["id"], index=n_calls)])
                n_calls += 1
            else:
                invalid.append(value)
                continue
            gen = ChatGenerationChunk(message=chunk)
            if run_manager:
                run_manager.on_llm_new_token(chunk.content if isinstance(chunk.content, str) else "", chunk=gen)
            yield gen
        parser, n_prompt, n_prefill = state
        meta = {"finish_reason": parser.finish_reason, "invalid_tool_calls": invalid, **self._metadata(kwargs)}
        if parser.error is not None:
            meta["harmony_error"] = parser.error
            meta["unparsed_text"] = parser.unparsed_text
        last = AIMessageChunk(content="", response_metadata=meta, usage_metadata=usage(n_prompt, parser, n_prefill),
                              chunk_position="last")
        yield ChatGenerationChunk(message=last)


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
