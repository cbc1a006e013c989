"""Dataset rows (DESIGN §3) -> openai-harmony conversations -> (input_ids, labels).

The rendering itself is openai-harmony's ``render_conversation_for_training``; this module only
maps the OpenAI-style row onto harmony messages and marks which tokens are trained:

- system: ``SystemContent.new()`` with the row's reasoning effort (harmony's default, medium, when
  the row has none) and no conversation start date, so renders do not change from day to day;
- ``system``/``developer`` rows: the developer message's instructions (joined by a blank line);
  the row's ``tools``: its function tools;
- assistant ``thinking`` -> analysis channel; ``content`` -> final channel (a commentary
  preamble when the same message also calls tools); each tool call -> commentary channel,
  recipient ``functions.NAME``, content type ``<|constrain|>json``, dict arguments as
  ``json.dumps(args, ensure_ascii=False)``, string arguments verbatim;
- tool results -> author ``functions.NAME`` (role tool) to ``assistant`` on commentary.

Labels follow the Hugging Face convention (aligned with input_ids, not shifted): every token of an
assistant message after its ``<|start|>assistant`` pair is trained (channel, recipient, content
and the stop token), everything else is -100.

Rows are assumed valid here; :mod:`ossforge.finetune.data` checks them first and reports
``FILE:LINE: reason``. Malformed rows still raise ``ValueError`` rather than render silently wrong.
"""

from __future__ import annotations

import json

from ossforge.model import tokenizer as tok

IGNORE = -100
REASONING_EFFORTS = ("low", "medium", "high")
ROLES = ("system", "developer", "user", "assistant", "tool")
ASSISTANT = 173781  # o200k_harmony id of the text "assistant" (the role token after <|start|>)
STOPS = frozenset((tok.END, tok.CALL, tok.RETURN))
JSON_CONTENT_TYPE = "<|constrain|>json"


def text_of(content) -> str:
    """Text of an OpenAI ``content`` field: a string or a list of ``{"type": "text"}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ValueError(f"content must be a string or a list of text parts, got {type(content).__name__}")


def tool_result_text(content) -> str:
    """Text of a tool result: strings and text parts as they are, other JSON values dumped."""
    try:
        return text_of(content)
    except ValueError:
        return json.dumps(content, ensure_ascii=False)


def tool_spec(tool: dict) -> dict:
    """``{"name", "description", "parameters"}`` from either the row format or OpenAI's
    ``{"type": "function", "function": {...}}`` wrapper."""
    if isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict):
        return tool["function"]
    return tool


def call_name_and_args(call: dict) -> tuple[str, str]:
    """(name, argument text) of one OpenAI-style tool call."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError("tool call without a function name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        return fn["name"], args
    return fn["name"], json.dumps(args, ensure_ascii=False)


def build_conversation(messages: list[dict], tools: list[dict] | None = None,
                       reasoning_effort: str | None = None, *, drop_analysis: bool = False):
    """The harmony ``Conversation`` of a dataset row's messages.

    ``drop_analysis`` is accepted for symmetry with :func:`render_row`; the conversation is the
    same either way (harmony drops analysis at render time).
    """
    import openai_harmony as oh

    del drop_analysis
    system = oh.SystemContent.new()
    if reasoning_effort is not None:
        effort = str(reasoning_effort).lower()
        if effort not in REASONING_EFFORTS:
            raise ValueError(f"reasoning_effort must be one of low, medium, high, got {reasoning_effort!r}")
        system = system.with_reasoning_effort(oh.ReasoningEffort(effort.capitalize()))
    out = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]

    instructions = [text_of(m.get("content")) for m in messages if m.get("role") in ("system", "developer")]
    if instructions or tools:
        dev = oh.DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions("\n\n".join(instructions))
        if tools:
            descs = []
            for t in tools:
                spec = tool_spec(t)
                descs.append(oh.ToolDescription.new(spec["name"], spec.get("description") or "", spec.get("parameters")))
            dev = dev.with_function_tools(descs)
        out.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev))

    pending: list[tuple[str | None, str]] = []  # (call id, name) of calls not yet answered
    seen_turn = False
    for m in messages:
        role = m.get("role")
        if role in ("system", "developer"):
            if seen_turn:
                raise ValueError(f"{role} message after the conversation started")
            continue
        seen_turn = True
        if role == "user":
            out.append(oh.Message.from_role_and_content(oh.Role.USER, text_of(m.get("content"))))
        elif role == "assistant":
            out.extend(_assistant_messages(oh, m, pending))
        elif role == "tool":
            name = match_tool_result(m, pending)
            text = tool_result_text(m.get("content"))
            out.append(
                oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, f"functions.{name}"), text)
                .with_channel("commentary")
                .with_recipient("assistant")
            )
        else:
            raise ValueError(f"unknown role {role!r}")
    return oh.Conversation.from_messages(out)


def _assistant_messages(oh, m: dict, pending: list) -> list:
    msgs = []
    thinking = m.get("thinking")
    calls = m.get("tool_calls") or []
    content = text_of(m.get("content"))
    if thinking:
        msgs.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, thinking).with_channel("analysis"))
    if content:
        channel = "commentary" if calls else "final"  # text beside tool calls is a preamble
        msgs.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, content).with_channel(channel))
    for call in calls:
        name, args = call_name_and_args(call)
        pending.append((call.get("id"), name))
        msgs.append(
            oh.Message.from_role_and_content(oh.Role.ASSISTANT, args)
            .with_channel("commentary")
            .with_recipient(f"functions.{name}")
            .with_content_type(JSON_CONTENT_TYPE)
        )
    if not msgs:
        raise ValueError("assistant message without thinking, content or tool_calls")
    return msgs


def match_tool_result(m: dict, pending: list) -> str:
    """The function a tool result answers: by ``tool_call_id``, else ``name``, else the oldest
    unanswered call. The matched call is marked answered."""
    call_id, name = m.get("tool_call_id"), m.get("name")
    match = None
    if call_id is not None:
        match = next((i for i, (pid, _) in enumerate(pending) if pid == call_id), None)
    if match is None and name:
        match = next((i for i, (_, pname) in enumerate(pending) if pname == name), None)
    if match is None and not name and call_id is None and pending:
        match = 0
    if match is None:
        what = f" for {name!r}" if name else (f" for call id {call_id!r}" if call_id is not None else "")
        raise ValueError(f"tool result{what} without a matching assistant tool call")
    called = pending.pop(match)[1]
    if name and name != called:
        raise ValueError(f"tool result named {name!r} answers call id {call_id!r}, a call to {called!r}")
    return called


def row_conversation(row: dict):
    """:func:`build_conversation` of a whole dataset row."""
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        raise ValueError("row must be an object with a messages list")
    return build_conversation(row["messages"], row.get("tools"), row.get("reasoning_effort"))


def assistant_labels(input_ids: list[int]) -> list[int]:
    """Labels for rendered harmony tokens: assistant message bodies keep their ids, all else -100.

    Message text is always encoded with special tokens disallowed, so ``<|start|>`` only ever
    appears as a real message start and a scan over the tokens finds every message exactly.
    """
    labels = [IGNORE] * len(input_ids)
    i, n = 0, len(input_ids)
    while i < n:
        if input_ids[i] == tok.START and i + 1 < n and input_ids[i + 1] == ASSISTANT:
            j = i + 2
            while j < n:
                labels[j] = input_ids[j]
                if input_ids[j] in STOPS:
                    break
                j += 1
            i = j + 1
        else:
            i += 1
    return labels


def render_row(row: dict, *, drop_analysis: bool = False) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one dataset row, as openai-harmony renders it for training."""
    import openai_harmony as oh

    convo = row_conversation(row)
    ids = tok.harmony_encoding().render_conversation_for_training(
        convo, oh.RenderConversationConfig(auto_drop_analysis=drop_analysis)
    )
    ids = [int(t) for t in ids]
    return ids, assistant_labels(ids)
