"""Tool JSON schemas and names in the shapes harmony can render.

openai-harmony turns a function's JSON schema into a TypeScript-like type. It knows ``type``,
``enum``, ``oneOf``, ``nullable``, nested objects and arrays, but writes ``any`` for ``$ref`` and
``anyOf`` — exactly what pydantic emits for nested models and ``Optional[X]``. We inline ``$defs``,
turn ``anyOf[X, null]`` into ``X`` + ``nullable`` and other ``anyOf`` into ``oneOf``, so the model
sees real types. Tool names become ``functions.NAME`` recipients, which end at whitespace or a dot,
so other names are mapped to safe ones and back.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from langchain_core.utils.function_calling import convert_to_openai_tool

_MAX_DEPTH = 12
_SAFE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def normalize_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` with ``$defs`` inlined and ``anyOf`` rewritten (see module doc)."""
    schema = copy.deepcopy(schema or {})
    defs = {**schema.pop("definitions", {}), **schema.pop("$defs", {})}
    out = _normalize(schema, defs, 0)
    if not out.get("type") and "properties" in out:
        out["type"] = "object"
    return out


def _resolve(ref: str, defs: dict[str, Any]) -> dict[str, Any]:
    name = ref.rsplit("/", 1)[-1]
    return copy.deepcopy(defs.get(name, {}))


def _normalize(node: Any, defs: dict[str, Any], depth: int) -> Any:
    if isinstance(node, list):
        return [_normalize(x, defs, depth) for x in node]
    if not isinstance(node, dict):
        return node
    if depth > _MAX_DEPTH:  # recursive models: stop inlining
        return {k: v for k, v in node.items() if k in ("description", "title")}
    node = dict(node)
    if "$ref" in node:
        target = _resolve(node.pop("$ref"), defs)
        node = {**target, **node}  # local description/default win over the definition's
    if "allOf" in node and len(node["allOf"]) == 1:
        inner = node.pop("allOf")[0]
        if "$ref" in inner:
            inner = _resolve(inner["$ref"], defs)
        node = {**inner, **node}
    if "anyOf" in node:
        options = node.pop("anyOf")
        non_null = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
        if len(non_null) < len(options):
            node["nullable"] = True
        if len(non_null) == 1:
            inner = non_null[0]
            if "$ref" in inner:
                inner = _resolve(inner["$ref"], defs)
            node = {**inner, **node}
        elif non_null:
            node["oneOf"] = non_null
    node.pop("title", None)
    return {k: (_normalize(v, defs, depth + 1) if k not in ("enum", "const", "default", "required") else v)
            for k, v in node.items()}


def tool_to_function_spec(tool: Any) -> dict[str, Any]:
    """``{name, description, parameters}`` of a langchain tool / function / dict / pydantic model."""
    if isinstance(tool, dict) and "parameters" in tool and "name" in tool and "function" not in tool:
        spec = {"name": tool["name"], "description": tool.get("description", ""), "parameters": tool["parameters"]}
    else:
        fn = convert_to_openai_tool(tool)["function"]
        spec = {"name": fn["name"], "description": fn.get("description", ""),
                "parameters": fn.get("parameters", {"type": "object", "properties": {}})}
    spec["parameters"] = normalize_schema(spec["parameters"])
    return spec


class ToolNames:
    """Bidirectional map between user tool names and names harmony can carry as recipients."""

    def __init__(self, names: list[str]):
        self.to_harmony: dict[str, str] = {}
        self.from_harmony: dict[str, str] = {}
        for name in names:
            safe = name if _SAFE_NAME.match(name) else (re.sub(r"[^A-Za-z0-9_]", "_", name) or "tool")
            if not re.match(r"[A-Za-z_]", safe):
                safe = "_" + safe
            base, n = safe, 2
            while safe in self.from_harmony:
                safe, n = f"{base}_{n}", n + 1
            self.to_harmony[name] = safe
            self.from_harmony[safe] = name

    def harmony(self, name: str) -> str:
        return self.to_harmony.get(name, name)

    def user(self, name: str) -> str | None:
        """The bound tool's own name, or None when the model named a tool that was not bound."""
        return self.from_harmony.get(name)
