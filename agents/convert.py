"""LangChain messages -> dataset-row messages -> harmony prompt tokens.

The row format is the training data's (DESIGN §3), and the harmony conversation is built by the
same function training uses (``ossforge.finetune.harmony.build_conversation``), so an agent's
prompt renders exactly like the conversations the model was tuned on.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

from ossforge.agents.schema import ToolNames
from ossforge.model import tokenizer as tok


def text_of(content: Any) -> str:
    """The text of a message's content (string, or a list of blocks; non-text blocks dropped)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
    return "".join(parts)


def to_rows(messages: Sequence[BaseMessage], names: ToolNames | None = None) -> list[dict[str, Any]]:
    """Row-format messages. System messages are hoisted to the front (harmony has one developer
    message); an error ToolMessage is marked with an ``error:`` prefix the model learns to read."""
    names = names or ToolNames([])
    system, rows = [], []
    call_names: dict[str, str] = {}
    for m in messages:
        if isinstance(m, SystemMessage) or m.type in ("system", "developer"):
            system.append({"role": "system", "content": text_of(m.content)})
        elif isinstance(m, HumanMessage) or m.type == "human":
            rows.append({"role": "user", "content": text_of(m.content)})
        elif isinstance(m, AIMessage):
            row = _assistant_row(m, names, call_names)
            if row is not None:
                rows.append(row)
        elif isinstance(m, ToolMessage):
            content = text_of(m.content) if not isinstance(m.content, str) else m.content
            if getattr(m, "status", "success") == "error" and not content.startswith("error"):
                content = f"error: {content}"
            name = call_names.get(m.tool_call_id) or names.harmony(m.name or "unknown")
            rows.append({"role": "tool", "name": name, "tool_call_id": m.tool_call_id, "content": content})
        else:
            raise ValueError(f"unsupported message type {m.type!r}")
    return system + rows


def _assistant_row(m: AIMessage, names: ToolNames, call_names: dict[str, str]) -> dict | None:
    calls = []
    for tc in m.tool_calls:
        hname = names.harmony(tc["name"])
        call_names[tc.get("id") or ""] = hname
        calls.append({"id": tc.get("id"), "type": "function",
                      "function": {"name": hname, "arguments": tc.get("args") or {}}})
    for bad in m.invalid_tool_calls:  # shown back as written, so the error that follows makes sense
        hname = names.harmony(bad.get("name") or "unknown")
        call_names[bad.get("id") or ""] = hname
        calls.append({"id": bad.get("id"), "type": "function",
                      "function": {"name": hname, "arguments": bad.get("args") or ""}})
    row: dict[str, Any] = {"role": "assistant"}
    thinking = m.additional_kwargs.get("reasoning_content")
    if thinking:
        row["thinking"] = thinking
    content = text_of(m.content)
    if content:
        row["content"] = content
    if calls:
        row["tool_calls"] = calls
    return row if len(row) > 1 else None


def response_format_text(response_format: dict) -> str:
    """Harmony's ``# Response Formats`` section for a JSON schema (or a plain JSON-object request).

    openai-harmony 0.0.8's ``DeveloperContent`` has no response-format field, so the section is
    written as the harmony spec shows it (``## name``, ``// description``, the schema) and rendered
    with the developer instructions.
    """
    if response_format.get("type") == "json_object":
        return ("# Response Formats\n\nReply in the final channel with one JSON object and nothing else "
                "(no prose, no code fences).")
    name = response_format.get("name") or "response"
    desc = response_format.get("description") or ""
    schema = json.dumps(response_format.get("schema") or {}, ensure_ascii=False)
    lines = ["# Response Formats", "", f"## {name}", ""]
    if desc:
        lines.append(f"// {desc}")
    lines.append(schema)
    return "\n".join(lines)


def render_prompt(messages: Sequence[BaseMessage], tool_specs: list[dict] | None, reasoning_effort: str | None,
                  names: ToolNames | None = None, *, response_format: dict | None = None) -> list[int]:
    """Prompt token ids ending in ``<|start|>assistant``, ready for the model to continue.
    ``response_format``: see :func:`response_format_text` (added to the developer message)."""
    import openai_harmony as oh

    from ossforge.finetune.harmony import build_conversation

    rows = to_rows(messages, names)
    if response_format:
        rows.insert(sum(r["role"] == "system" for r in rows), {"role": "system", "content": response_format_text(response_format)})
    convo = build_conversation(rows, tool_specs or None, reasoning_effort)
    return [int(t) for t in tok.harmony_encoding().render_conversation_for_completion(convo, oh.Role.ASSISTANT)]


def call_header(tool_name: str | None) -> list[int]:
    """Tokens that prefill an assistant tool-call header (after ``<|start|>assistant``), exactly as
    training renders it: `` to=functions.NAME<|channel|>commentary <|constrain|>json<|message|>``.
    With ``tool_name=None`` only `` to=functions`` (the model picks the tool)."""
    import openai_harmony as oh

    enc = tok.harmony_encoding()
    if tool_name is None:
        return enc.encode(" to=functions", allowed_special=set())  # ".NAME" merges with the dot
    msg = (oh.Message.from_role_and_content(oh.Role.ASSISTANT, "{}").with_channel("commentary")
           .with_recipient(f"functions.{tool_name}").with_content_type("<|constrain|>json"))
    ids = enc.render(msg)
    # drop "<|start|>assistant" and everything after <|message|>
    return [int(t) for t in ids[2:ids.index(tok.MESSAGE) + 1]]
