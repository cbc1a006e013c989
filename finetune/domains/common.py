"""Shared pieces of the domain generators: row builders, number formatting, JSONL writing.

Rows follow DESIGN §3 (``messages`` / ``tools`` / ``reasoning_effort``). Files are written
deterministically (fixed key order, ``ensure_ascii=False``, ``\\n`` endings) so regenerating
with the same seed gives byte-identical output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from ossforge import atomic

EFFORTS = ("low", "medium", "high")


def num(x: float) -> int | float:
    """A tidy JSON number: ints stay ints, floats are rounded to 4 significant decimals."""
    if isinstance(x, int):
        return x
    r = round(float(x), 4)
    return int(r) if r == int(r) else r


def fmt(x: float) -> str:
    """Human text for a number: ``270``, ``1.8``, ``0.23`` (never ``1.8000000000000003``)."""
    return str(num(x))


def call(name: str, arguments: dict[str, Any]) -> dict:
    """One OpenAI-style tool call with dict arguments."""
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def assistant(thinking: str, content: str | None = None, tool_calls: list[dict] | None = None) -> dict:
    msg: dict[str, Any] = {"role": "assistant", "thinking": thinking}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    if content is not None:
        msg["content"] = content
    return msg


def tool_result(name: str, content: str) -> dict:
    return {"role": "tool", "name": name, "content": content}


def row(system: str, messages: list[dict], tools: list[dict], effort: str) -> dict:
    """A dataset row; ``tools`` is left out when there are none."""
    out: dict[str, Any] = {"messages": [{"role": "system", "content": system}, *messages]}
    if tools:
        out["tools"] = tools
    out["reasoning_effort"] = effort
    return out


def dumps_row(r: dict) -> str:
    return json.dumps(r, ensure_ascii=False)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write rows atomically (temp file + rename); returns the number of rows."""
    n = 0
    with atomic.open_file(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(dumps_row(r) + "\n")
            n += 1
    return n
