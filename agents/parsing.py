"""Harmony completions -> LangChain messages, token by token, with openai-harmony's parser.

A completion is what the model writes after ``<|start|>assistant`` (a prefilled header included),
for example ``<|channel|>analysis<|message|>...<|end|><|start|>assistant to=functions.dose_calc
<|channel|>commentary <|constrain|>json<|message|>{...}<|call|>``. :class:`CompletionParser` feeds
it to ``openai_harmony.StreamableParser`` and turns what comes out into events:

- ``("reasoning", text)``  analysis channel (never user-facing)
- ``("content", text)``    final channel, and commentary text without a recipient (preambles)
- ``("tool_call", {...})`` a complete, valid ``functions.NAME`` call
- ``("invalid_tool_call", {...})`` bad JSON, a tool that was not bound, or a call cut off before
  ``<|call|>``; these never become tool calls.

``invoke`` and ``stream`` both run on these events, so they cannot disagree.
:func:`parse_completion` is the one-shot form (e.g. to score tool calls offline).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

from langchain_core.messages import AIMessage
from langchain_core.messages.tool import invalid_tool_call as make_invalid_tool_call
from langchain_core.messages.tool import tool_call as make_tool_call

from ossforge.agents.schema import ToolNames
from ossforge.model import tokenizer as tok

_STOPS = (tok.END, tok.CALL, tok.RETURN)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class CompletionParser:
    """Incremental harmony parser; ``feed`` one token at a time, then ``finish``.

    ``tool_names`` maps the bound tools (None or empty: no tool is bound, every call is invalid).
    """

    tool_names: ToolNames | None = None
    tool_schemas: dict[str, dict] | None = None  # strict=True: arguments must match these JSON schemas
    tokens: list[int] = field(default_factory=list)
    reasoning_tokens: int = 0
    stop_token: int | None = None  # the <|end|>/<|call|>/<|return|> the completion ended on
    error: str | None = None  # harmony could not parse the rest (kept in ``unparsed``)
    unparsed: list[int] = field(default_factory=list)

    def __post_init__(self):
        import openai_harmony as oh

        self._oh = oh
        self._parser = oh.StreamableParser(tok.harmony_encoding(), oh.Role.ASSISTANT, strict=False)
        self._done = False  # <|call|> or <|return|> seen: the turn is over
        self._n_messages = 0
        self._had_content = False
        self._had_reasoning = False
        self._in_message = False  # inside a message body (after its <|message|>)
        self._new_message = False  # no text of the current message emitted yet
        self._ended_early = False

    # ------------------------------------------------------------ feeding

    def feed(self, token: int) -> list[tuple[str, Any]]:
        token = int(token)
        if self._done or self.error is not None:
            self.unparsed.append(token)
            return []
        self.tokens.append(token)
        p = self._parser
        was_content = self._in_message
        prev_channel = p.current_channel if was_content else None
        try:
            p.process(token)
        except Exception as exc:  # harmony rejects the token: stop parsing, keep the rest aside
            self.error = str(exc)
            self.unparsed.append(token)
            return []
        events: list[tuple[str, Any]] = []
        state = p.state.value
        if state == "Content":
            if not was_content:
                self._in_message = self._new_message = True
            channel, recipient = p.current_channel, p.current_recipient
            if was_content and channel == "analysis" and not recipient:
                self.reasoning_tokens += 1
            delta = p.last_content_delta
            if delta and not recipient and p.current_role == self._oh.Role.ASSISTANT:
                events.extend(self._text_event(channel, delta))
        elif was_content and token in _STOPS:
            if prev_channel == "analysis":
                self.reasoning_tokens += 1  # the analysis message's own stop token
            self._in_message = False
            events.extend(self._complete_messages())
            self.stop_token = token
            if token in (tok.CALL, tok.RETURN):
                self._done = True
        elif state == "Header":
            self.stop_token = None  # a new message has begun
        return events

    def feed_all(self, tokens: Iterable[int]) -> list[tuple[str, Any]]:
        events = []
        for t in tokens:
            events.extend(self.feed(t))
        return events

    def end_early(self) -> None:
        """The caller ended the turn (a text stop sequence was found): finish_reason ``stop``."""
        self._done = self._ended_early = True

    def finish(self) -> list[tuple[str, Any]]:
        """Events for a completion that ended without a stop token (cut off at max_tokens)."""
        if self._done or self.error is not None or not self._in_message:
            return []
        p = self._parser
        if p.state.value == "Content" and p.current_recipient:
            name = self._tool_name(p.current_recipient)
            return [("invalid_tool_call", make_invalid_tool_call(
                name=name, args=p.current_content, id=new_call_id(),
                error="tool call cut off before <|call|> (max_tokens reached?)"))]
        return []

    # ------------------------------------------------------------ results

    @property
    def finish_reason(self) -> str:
        if self._ended_early:
            return "stop"
        if self.stop_token == tok.CALL:
            return "tool_calls"
        if self.stop_token is not None or self.error is not None:
            return "stop"  # <|return|>, or <|end|> where a server stops on it
        return "length"

    @property
    def unparsed_text(self) -> str:
        return tok.harmony_encoding().decode(self.unparsed) if self.unparsed else ""

    # ------------------------------------------------------------ internals

    def _text_event(self, channel, delta):
        # Separate consecutive messages of the same kind with a blank line.
        if channel == "analysis":
            kind, seen = "reasoning", self._had_reasoning
        elif channel in ("final", "commentary", None):
            kind, seen = "content", self._had_content
        else:
            return []
        out = []
        if self._new_message and seen:
            out.append((kind, "\n\n"))
        self._new_message = False
        if kind == "reasoning":
            self._had_reasoning = True
        else:
            self._had_content = True
        out.append((kind, delta))
        return out

    def _complete_messages(self):
        messages = self._parser.messages
        new, self._n_messages = messages[self._n_messages:], len(messages)
        events = []
        for m in new:
            if m.author.role != self._oh.Role.ASSISTANT or not m.recipient:
                continue
            text = "".join(getattr(c, "text", "") for c in m.content)
            events.append(self._call_event(m.recipient, text))
        return events

    def _tool_name(self, recipient: str) -> str:
        return recipient[len("functions."):] if recipient.startswith("functions.") else recipient

    def _call_event(self, recipient: str, text: str):
        hname = self._tool_name(recipient).strip()
        name = self.tool_names.user(hname) if self.tool_names else None
        call_id = new_call_id()
        if name is None:
            bound = ", ".join(self.tool_names.to_harmony) if self.tool_names and self.tool_names.to_harmony else "none"
            return ("invalid_tool_call", make_invalid_tool_call(
                name=hname, args=text, id=call_id,
                error=f"unknown tool {recipient!r}: the bound tools are {bound}"))
        try:
            args = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            return ("invalid_tool_call", make_invalid_tool_call(
                name=name, args=text, id=call_id, error=f"arguments are not valid JSON: {exc}"))
        if not isinstance(args, dict):
            return ("invalid_tool_call", make_invalid_tool_call(
                name=name, args=text, id=call_id, error="arguments must be a JSON object"))
        if self.tool_schemas is not None and name in self.tool_schemas:
            problem = schema_error(args, self.tool_schemas[name])
            if problem:
                return ("invalid_tool_call", make_invalid_tool_call(
                    name=name, args=text, id=call_id, error=f"arguments do not match the tool's schema: {problem}"))
        return ("tool_call", make_tool_call(name=name, args=args, id=call_id))


def schema_error(value: Any, schema: dict) -> str | None:
    """Why ``value`` does not match the JSON ``schema`` (jsonschema's message), or None when it does."""
    import jsonschema

    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        return f"{where + ': ' if where else ''}{exc.message}"
    except jsonschema.SchemaError as exc:
        return f"the schema itself is invalid: {exc.message}"
    return None


def usage(input_tokens: int, parser: CompletionParser, prefill: int = 0) -> dict[str, Any]:
    """langchain ``usage_metadata`` (reasoning tokens counted from the analysis channel)."""
    out = max(len(parser.tokens) + len(parser.unparsed) - prefill, 0)
    return {"input_tokens": input_tokens, "output_tokens": out, "total_tokens": input_tokens + out,
            "output_token_details": {"reasoning": parser.reasoning_tokens}}


def message_from_events(events: list[tuple[str, Any]], parser: CompletionParser,
                        metadata: dict | None = None) -> AIMessage:
    """One ``AIMessage`` of a whole completion (the invoke path)."""
    content, reasoning, calls, invalid = [], [], [], []
    for kind, value in events:
        if kind == "content":
            content.append(value)
        elif kind == "reasoning":
            reasoning.append(value)
        elif kind == "tool_call":
            calls.append(value)
        else:
            invalid.append(value)
    extra = {"reasoning_content": "".join(reasoning)} if reasoning else {}
    meta = {"finish_reason": parser.finish_reason, **(metadata or {})}
    if parser.error is not None:
        meta["harmony_error"] = parser.error
        meta["unparsed_text"] = parser.unparsed_text
    return AIMessage(content="".join(content), additional_kwargs=extra, tool_calls=calls,
                     invalid_tool_calls=invalid, response_metadata=meta)


def parse_completion(token_ids: Iterable[int], bound_tools: Iterable[Any] | ToolNames | None = None,
                     *, input_tokens: int = 0) -> AIMessage:
    """Parse the tokens written after ``<|start|>assistant`` into an ``AIMessage``.

    ``bound_tools``: the tools a call may name (langchain tools, functions, dicts, names, or a
    :class:`ToolNames`); other calls land in ``invalid_tool_calls``.
    """
    parser = CompletionParser(tool_names_of(bound_tools))
    events = parser.feed_all(token_ids)
    events += parser.finish()
    msg = message_from_events(events, parser)
    msg.usage_metadata = usage(input_tokens, parser)
    return msg


def tool_names_of(bound_tools) -> ToolNames | None:
    if bound_tools is None or isinstance(bound_tools, ToolNames):
        return bound_tools
    from ossforge.agents.schema import tool_to_function_spec

    names = [t if isinstance(t, str) else tool_to_function_spec(t)["name"] for t in bound_tools]
    return ToolNames(names)
