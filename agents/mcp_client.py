"""MCP tools for ``Agent``: load a server's tools into a :class:`ToolRegistry` with a run policy.

The tools come from ``langchain-mcp-adapters`` (async-only ``StructuredTool``s); the registry runs
them with the same timeout, approval and tracing as local tools (``Agent.arun`` awaits them, and
``Agent.run`` runs them on a fresh event loop in its worker thread).

A tool's risk is read from its MCP annotations, as the MCP spec defines their defaults: a tool
that does not say it is read-only is assumed to change things, and one that does not say it is
non-destructive is assumed destructive, so it needs approval.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from ossforge.agents.tools import Risk, ToolRegistry


def risk_of(annotations: dict[str, Any] | None) -> Risk:
    """low (read-only), medium (writes, not destructive) or high (destructive, the spec's default)."""
    ann = annotations or {}
    if ann.get("readOnlyHint") is True:
        return "low"
    if ann.get("destructiveHint") is False:
        return "medium"
    return "high"


def stdio_connection(domain: str) -> dict[str, Any]:
    """The langchain-mcp-adapters connection that launches ``ossforge mcp serve --domain DOMAIN``."""
    return {"transport": "stdio", "command": sys.executable,
            "args": ["-m", "ossforge", "mcp", "serve", "--domain", domain]}


async def amcp_registry(connections: dict[str, dict[str, Any]], *, timeout_s: float = 30.0,
                        registry: ToolRegistry | None = None) -> ToolRegistry:
    """Add every tool of the MCP servers in ``connections`` (langchain-mcp-adapters' connection
    dicts: ``{"name": {"transport": "stdio", "command": ..., "args": [...]}}`` or
    ``{"transport": "streamable_http", "url": ...}``) to ``registry`` (a new one by default)."""
    from langchain_mcp_adapters.client import MultiServerMCPClient

    registry = registry if registry is not None else ToolRegistry()
    # handle_tool_errors=False: a server-side error raises ToolException, which the loop turns into an
    # error ToolMessage (status "error"), as for local tools.
    for tool in await MultiServerMCPClient(connections, handle_tool_errors=False).get_tools():
        registry.register(tool, risk=risk_of(tool.metadata), timeout_s=timeout_s)
    return registry


def mcp_registry(connections: dict[str, dict[str, Any]], **kwargs) -> ToolRegistry:
    """:func:`amcp_registry` for synchronous code (not inside a running event loop)."""
    return asyncio.run(amcp_registry(connections, **kwargs))
