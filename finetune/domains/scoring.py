"""Scoring of model outputs: schema-strict checks of tool calls, answers of choice/exact sets.

These are ossforge's own rules, for the project's domain sets; rows converted from BFCL are scored by
BFCL's rules instead (:mod:`ossforge.finetune.domains.bfcl_checker`, ``ossforge eval --scoring``).

A tool-call case expects a list of calls, each ``{function_name: {param: [allowed values]}}`` (the
Berkeley Function-Calling Leaderboard's ``ground_truth`` layout; ``""`` among the allowed values
means the parameter may be left out). An empty list is a "no call" case. A prediction passes when:

- it makes exactly as many calls as expected, matched one to one in any order (parallel calls);
- every call names the expected function, gives every required parameter of the tool's schema,
  no parameter outside the schema or the expected set, values of the schema's type (an ``int``
  passes for ``number``, a ``bool`` never passes for a number), inside the schema's ``enum``, and
  equal to one of the allowed values (numbers within 1e-6 relative, strings compared BFCL-style:
  case, spaces and ``,./-_*^`` ignored; lists and objects element by element).
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any, Optional

_STRIP = re.compile(r"[ ,./\-_*^]")


def expected_from_calls(tool_calls: list[dict]) -> list[dict]:
    """Ground truth of a reference assistant message: each value is the only allowed one."""
    out = []
    for c in tool_calls or []:
        fn = c.get("function", c)
        args = fn.get("arguments", fn.get("args", {}))
        if isinstance(args, str):
            import json

            args = json.loads(args) if args.strip() else {}
        out.append({fn["name"]: {k: [v] for k, v in args.items()}})
    return out


def _norm_str(s: str) -> str:
    return _STRIP.sub("", s).lower().replace("'", '"')


def values_equal(got: Any, want: Any) -> bool:
    if isinstance(want, bool) or isinstance(got, bool):
        return isinstance(got, bool) and isinstance(want, bool) and got == want
    if isinstance(want, (int, float)):
        return isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(want, str):
        return isinstance(got, str) and _norm_str(got) == _norm_str(want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(values_equal(g, w) for g, w in zip(got, want))
    if isinstance(want, dict):
        return (isinstance(got, dict) and set(got) == set(want)
                and all(values_equal(got[k], want[k]) for k in want))
    return got == want


_TYPES = {
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def type_ok(value: Any, schema: dict) -> bool:
    if value is None:
        return bool(schema.get("nullable"))
    t = schema.get("type")
    types = t if isinstance(t, list) else [t] if t else []
    if types and not any(_TYPES.get(x, lambda v: True)(value) for x in types):
        return False
    if "enum" in schema and not any(values_equal(value, e) for e in schema["enum"]):
        return False
    return True


def check_call(name: str, args: dict, expected: dict, tools: dict[str, dict]) -> Optional[str]:
    """None when one predicted call matches one expected ``{name: {param: allowed}}``; else why not."""
    (want_name, allowed), = expected.items()
    if name != want_name:
        return f"function {name!r} instead of {want_name!r}"
    schema = (tools.get(name) or {}).get("parameters") or {}
    props = schema.get("properties") or {}
    for p in schema.get("required") or []:
        if p not in args:
            return f"missing required argument {p!r}"
    for p, value in args.items():
        if props and p not in props:
            return f"unknown argument {p!r}"
        if p not in allowed:
            return f"unexpected argument {p!r}"
        if p in props and not type_ok(value, props[p]):
            return f"argument {p!r}: wrong type or value outside enum ({value!r})"
        options = allowed[p] if isinstance(allowed[p], list) else [allowed[p]]
        if not any(values_equal(value, o) for o in options if o != ""):
            return f"argument {p!r}={value!r}, expected {' or '.join(repr(o) for o in options if o != '')}"
    for p, options in allowed.items():
        optional = isinstance(options, list) and "" in options
        if p not in args and not optional:
            return f"missing argument {p!r}"
    return None


def check_calls(predicted: list[dict], expected: list[dict], tools: list[dict]) -> Optional[str]:
    """None when the predicted calls (``[{name, args}]``) match the expected ones in some order."""
    if len(predicted) != len(expected):
        return f"{len(predicted)} calls instead of {len(expected)}"
    if not expected:
        return None
    by_name = {t["name"]: t for t in tools or []}
    first_reason = None
    for order in itertools.permutations(range(len(expected))):
        reasons = [check_call(p["name"], p.get("args") or {}, expected[i], by_name) for p, i in zip(predicted, order)]
        if all(r is None for r in reasons):
            return None
        first_reason = first_reason or next(r for r in reasons if r)
    return first_reason


# ----------------------------------------------------------------------------- answers

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def choice_answer(text: str, choices: list[str]) -> Optional[str]:
    """The option a reply picks: ``Answer: X`` first, else the first option named as a word."""
    if not text:
        return None
    lookup = {c.lower(): c for c in choices}
    m = re.search(r"answer\s*(?:is)?\s*[:\-]?\s*\(?([A-Za-z]+)\)?", text, re.IGNORECASE)
    if m and m.group(1).lower() in lookup:
        return lookup[m.group(1).lower()]
    for word in re.findall(r"[A-Za-z]+", text):
        if word.lower() in lookup and (len(word) > 1 or word.isupper()):
            return lookup[word.lower()]
    return None


def exact_answer_ok(text: str, answer: str) -> bool:
    """GSM8K-style: the last number in the reply equals the reference number."""
    nums = _NUMBER.findall(text or "")
    if not nums:
        return False
    try:
        return math.isclose(float(nums[-1].replace(",", "")), float(str(answer).replace(",", "")), rel_tol=1e-9)
    except ValueError:
        return False
