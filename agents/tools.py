"""Tool registry: langchain-core tools plus the policy the agent loop enforces for each.

A tool is an ordinary langchain-core ``BaseTool`` (pydantic ``args_schema``); the registry adds what a
loop needs to run it safely: a risk level, a timeout and whether a human must approve each call.
Tools may be sync, async or async-only (MCP tools from ``langchain-mcp-adapters``): :meth:`ToolRegistry.arun`
awaits ``tool.ainvoke``; :meth:`ToolRegistry.run` runs a sync tool in a worker thread and an
async-only one on a fresh event loop there, both under the same timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

from langchain_core.tools import BaseTool, StructuredTool

Risk = Literal["low", "medium", "high"]


class ToolTimeout(Exception):
    """A tool ran longer than its registered timeout."""


@dataclass
class RegisteredTool:
    """One tool and its run policy (``requires_approval`` defaults to ``risk == "high"``)."""

    tool: BaseTool
    risk: Risk = "low"
    timeout_s: float = 10.0
    requires_approval: bool = False

    @property
    def name(self) -> str:
        return self.tool.name


class ToolRegistry:
    """Named tools with their policies; iteration order is registration order."""

    def __init__(self, tools: Iterable[RegisteredTool] = ()):
        self._tools: dict[str, RegisteredTool] = {}
        for t in tools:
            self.add(t)

    def add(self, entry: RegisteredTool) -> RegisteredTool:
        if entry.risk not in ("low", "medium", "high"):
            raise ValueError(f"tool {entry.name!r}: risk must be low, medium or high, not {entry.risk!r}")
        if entry.name in self._tools:
            raise ValueError(f"tool {entry.name!r} is registered twice")
        self._tools[entry.name] = entry
        return entry

    def register(self, tool: BaseTool | Callable, *, risk: Risk = "low", timeout_s: float = 10.0,
                 requires_approval: bool | None = None) -> RegisteredTool:
        """Register a BaseTool, or a typed function (becomes a StructuredTool from its signature)."""
        if not isinstance(tool, BaseTool):
            tool = StructuredTool.from_function(tool)
        if requires_approval is None:
            requires_approval = risk == "high"
        return self.add(RegisteredTool(tool, risk, timeout_s, requires_approval))

    def __contains__(self, name: str) -> bool:
        return name in self._tools

    def __getitem__(self, name: str) -> RegisteredTool:
        return self._tools[name]

    def __iter__(self):
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def names(self) -> list[str]:
        return list(self._tools)

    def tools(self) -> list[BaseTool]:
        """The langchain-core tools, ready for ``ChatGptOss.bind_tools``."""
        return [t.tool for t in self._tools.values()]

    def run(self, name: str, args: dict[str, Any]) -> str:
        """Validate ``args`` against the tool's schema and run it under its timeout.

        Raises KeyError (unknown tool), pydantic ValidationError / ToolException (bad args or a tool
        failure) and ToolTimeout; the loop turns each into an error ToolMessage.
        """
        entry = self._tools[name]
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tool-{name}")
        if is_async_only(entry.tool):
            def call(a):
                return asyncio.run(entry.tool.ainvoke(a))
        else:
            call = entry.tool.invoke
        try:
            future = pool.submit(call, args)
            try:
                result = future.result(timeout=entry.timeout_s)
            except concurrent.futures.TimeoutError:
                raise ToolTimeout(f"tool {name} timed out after {entry.timeout_s:g} s") from None
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return result if isinstance(result, str) else _text_result(result)

    async def arun(self, name: str, args: dict[str, Any]) -> str:
        """:meth:`run` for the event loop: ``await tool.ainvoke`` under the tool's timeout (a sync
        tool runs in langchain's executor, an async or MCP tool on this loop); same exceptions."""
        entry = self._tools[name]
        try:
            result = await asyncio.wait_for(entry.tool.ainvoke(args), timeout=entry.timeout_s)
        except asyncio.TimeoutError:
            raise ToolTimeout(f"tool {name} timed out after {entry.timeout_s:g} s") from None
        return result if isinstance(result, str) else _text_result(result)

    def as_dataset_tools(self) -> list[dict[str, Any]]:
        """``[{name, description, parameters}]``: the dataset row's ``tools`` field (DESIGN §3)."""
        from ossforge.agents.schema import tool_to_function_spec

        return [tool_to_function_spec(t) for t in self.tools()]


def is_async_only(tool: BaseTool) -> bool:
    """A StructuredTool with a coroutine and no function (as langchain-mcp-adapters builds MCP tools)."""
    return isinstance(tool, StructuredTool) and tool.func is None and tool.coroutine is not None


def _text_result(result: Any) -> str:
    """A tool result as text: MCP tools return content blocks (``[{"type": "text", "text": ...}]``)."""
    if isinstance(result, (list, tuple)) and result and all(isinstance(b, dict) and "type" in b for b in result):
        return "\n".join(str(b.get("text", b)) for b in result)
    return str(result)
