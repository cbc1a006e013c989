"""BFCL-exact scoring of tool calls: the rules of the Berkeley Function-Calling Leaderboard's AST
checker (``bfcl_eval/eval_checker/ast_eval/ast_checker.py``, Python categories), so that a figure
from ``ossforge eval`` on converted BFCL data is the figure BFCL's own checker gives.

Written here from BFCL's documented behaviour, not copied: the package cannot be a dependency (it
pulls every model SDK), and its checker is tested against ours in ``tests/test_bfcl_agreement.py``.
The rules, which differ from ossforge's stricter schema checks (``scoring.check_calls``):

- types are BFCL's own (``metadata.functions`` keeps them): ``float`` takes an int (converted),
  ``tuple`` is a list, ``any`` must be a string, ``bool`` never passes for ``integer``; arrays check
  their items one level deep; enums and the schema's ``required`` beyond BFCL's are not checked;
- the *variable rule*: when the allowed values' type differs from the declared one (the string
  ``"data['sales']"`` for an array), a value of the allowed values' type is taken as a variable
  reference and compared as it is;
- strings (and strings inside lists and dicts) compare after removing spaces and ``,./-_*^`` and
  lower-casing; numbers compare with Python ``==`` (``2 == 2.0``, no tolerance);
- a ``dict`` parameter's answer is ``{key: [allowed...]}`` (one level), a list of dicts is matched
  element by element; ``""`` among the allowed values marks an optional parameter or key; ``None``
  is an ordinary allowed value;
- ``parallel*`` categories match calls to answers in any order (greedily, answer by answer, as BFCL
  does); ``multiple`` categories score the one call against the function the answer names; other
  categories need exactly one call; ``irrelevance`` categories pass when no valid call is made.
"""

from __future__ import annotations

import re
from typing import Any, Optional

_PY_TYPES = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list, "tuple": list,
             "dict": dict, "any": str}
_STRIP = re.compile(r"[ ,./\-_*^]")


def standardize(text: str) -> str:
    """BFCL's string normalisation: no spaces or ``,./-_*^``, lower case, ``'`` -> ``"``."""
    return _STRIP.sub("", text).lower().replace("'", '"')


def _std(value: Any) -> Any:
    return standardize(value) if type(value) is str else value


def _std_all(options: Any) -> list:
    """Standardised elements of an allowed-values container (a string counts as its characters, as
    BFCL's index loop reads it)."""
    if isinstance(options, (list, str)):
        return [_std(options[i]) for i in range(len(options))]
    return [options]


def _answer_type(allowed: list) -> Optional[type]:
    """Type of the first non-optional allowed value (None when all are ``""``)."""
    for option in allowed:
        if option != "":
            return type(option)
    return None


def _type_ok(value: Any, allowed: list, expected: type, item: Optional[type]) -> tuple[bool, bool]:
    """(type accepted, value is a variable reference)."""
    answer_type = _answer_type(allowed)
    variable = answer_type is not None and answer_type is not expected
    if type(value) is expected:
        if item is None:
            return True, variable
        for option in allowed:
            if not isinstance(option, list) or all(_type_ok(v, option, item, None)[0] for v in value):
                return True, variable
        return False, variable
    if answer_type is not None and type(value) is answer_type:
        return True, True
    return False, variable


def _dict_ok(value: Any, options: list) -> bool:
    if not isinstance(value, dict):
        return False
    for option in options:
        if option == "" or not isinstance(option, dict):
            continue
        if all(k in option and _std(v) in _std_all(option[k]) for k, v in value.items()) and \
                all(k in value or "" in allowed for k, allowed in option.items()):
            return True
    return False


def _dict_list_ok(value: list, options: list) -> bool:
    for option in options:
        if not isinstance(option, (list, str)) or len(option) != len(value):
            continue
        if all(_dict_ok(v, [option[i]]) for i, v in enumerate(value)):
            return True
    return False


def _value_ok(value: Any, allowed: list, expected: type, item: Optional[type]) -> bool:
    if expected is dict:
        return _dict_ok(value, allowed)
    if expected is list and item is dict:
        return _dict_list_ok(value, allowed)
    if expected is str:
        return standardize(value) in [standardize(o) for o in allowed if type(o) is str]
    if expected is list:
        return [_std(v) for v in value] in [_std_all(o) for o in allowed]
    return value in allowed


def check_function(function: dict, name: str, args: dict, expected: dict) -> Optional[str]:
    """None when one call (``name``, ``args``) passes BFCL's simple-function check against one
    answer ``{function: {param: [allowed]}}`` for the BFCL ``function`` description; else why not."""
    from ossforge.finetune.domains.loaders import safe_tool_name

    (_, answer), = expected.items()
    want = safe_tool_name(function["name"])
    if name != want:
        return f"function {name!r} instead of {want!r}"
    params = function.get("parameters") or {}
    props = params.get("properties") or {}
    for p in params.get("required") or []:
        if p not in args:
            return f"missing required argument {p!r}"
    for p, value in args.items():
        if p not in props or p not in answer:
            return f"unexpected argument {p!r}"
        declared = props[p].get("type")
        expected_type = _PY_TYPES.get(declared, object)
        items = props[p].get("items") if declared in ("array", "tuple") else None
        item_type = _PY_TYPES.get(items.get("type")) if isinstance(items, dict) else None
        if declared == "tuple" and type(value) is tuple:
            value = list(value)
        if declared == "float" and type(value) is int:
            value = float(value)  # Python's int -> float promotion
        ok, variable = _type_ok(value, answer[p], expected_type, item_type)
        if not ok:
            return f"argument {p!r}: expected type {declared}, got {type(value).__name__} ({value!r})"
        matched = (value in answer[p]) if variable else _value_ok(value, answer[p], expected_type, item_type)
        if not matched:
            return f"argument {p!r}={value!r}, expected one of {answer[p]!r}"
    for p, allowed in answer.items():
        if p not in args and "" not in allowed:
            return f"missing argument {p!r}"
    return None


def check_calls_bfcl(predicted: list[dict], expected: list[dict], functions: list[dict], category: str) -> Optional[str]:
    """None when the predicted calls (``[{name, args}]``, harmony-safe names) pass BFCL's AST check
    for ``category``; else the reason. ``expected`` uses the same safe names; ``functions`` are
    BFCL's original descriptions (``metadata.functions``)."""
    from ossforge.finetune.domains.loaders import safe_tool_name

    if "irrelevance" in category or not expected:
        return None if not predicted else "called a tool"
    by_name = {safe_tool_name(f["name"]): f for f in functions}

    def one(call: dict, answer: dict) -> Optional[str]:
        function = by_name.get(next(iter(answer)))
        if function is None:
            return f"answer names unknown function {next(iter(answer))!r}"
        return check_function(function, call["name"], call.get("args") or {}, answer)

    if len(predicted) != len(expected):
        return f"{len(predicted)} calls instead of {len(expected)}"
    if "parallel" in category:
        matched: set[int] = set()
        for i, answer in enumerate(expected):
            reasons = []
            for j, call in enumerate(predicted):
                if j in matched:
                    continue
                why = one(call, answer)
                if why is None:
                    matched.add(j)
                    break
                reasons.append(why)
            else:
                return f"no call matches answer {i + 1}: {reasons[0] if reasons else 'none left'}"
        return None
    if "multiple" in category:
        return one(predicted[0], expected[0])
    return check_function(functions[0], predicted[0]["name"], predicted[0].get("args") or {}, expected[0])
