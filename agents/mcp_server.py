"""Serve a domain's tools to other agents over MCP (Model Context Protocol).

Serves the tools of the medicine or education assistant (drug lookup, dose calculator, step
checker, ...) to any MCP client: Claude Desktop, an IDE, another agent, or an ossforge agent.
Each call gets the same argument checks and timeouts as in the built-in assistant.

Each tool's risk is published as MCP tool annotations: low -> read-only; medium -> may change
things, not destructive; high -> destructive (clients should ask the user first).

examples:
  ossforge mcp serve --domain medicine                  # stdio (what MCP clients launch)
  ossforge mcp serve --domain education --port 8765     # streamable HTTP at http://127.0.0.1:8765/mcp
"""

from __future__ import annotations

from typing import Any

from ossforge.errors import UserError

RISK_ANNOTATIONS = {
    "low": {"readOnlyHint": True, "destructiveHint": False},
    "medium": {"readOnlyHint": False, "destructiveHint": False},
    "high": {"readOnlyHint": False, "destructiveHint": True},
}


def tool_annotations(entry) -> Any:
    """The MCP ``ToolAnnotations`` of a registered tool (its risk as read-only/destructive hints)."""
    from mcp.types import ToolAnnotations

    return ToolAnnotations(title=entry.name.replace("_", " "), openWorldHint=False, idempotentHint=entry.risk == "low",
                           **RISK_ANNOTATIONS[entry.risk])


def build_server(registry, *, name: str, instructions: str | None = None, host: str = "127.0.0.1",
                 port: int = 8000):
    """A FastMCP server offering every tool of ``registry``.

    The langchain -> MCP schema conversion is ``langchain_mcp_adapters.tools.to_fastmcp``; the call
    itself goes through ``registry.arun`` so the registered timeout and validation apply.
    """
    from langchain_mcp_adapters.tools import to_fastmcp
    from mcp.server.fastmcp import FastMCP

    tools = []
    for entry in registry:
        async def call(_name=entry.name, **arguments):
            return await registry.arun(_name, arguments)

        tool = to_fastmcp(entry.tool)
        tools.append(tool.model_copy(update={"fn": call, "annotations": tool_annotations(entry)}))
    return FastMCP(name, instructions=instructions, tools=tools, host=host, port=port, log_level="WARNING")


def domain_server(domain: str, **kwargs):
    from ossforge.agents.domains import load

    mod = load(domain)
    return build_server(mod.registry(), name=f"ossforge-{domain}",
                        instructions=f"Tools of the ossforge {domain} assistant. {mod.DISCLAIMER}".strip(), **kwargs)


def add_arguments(p):
    sub = p.add_subparsers(dest="mcp_command", metavar="SUBCOMMAND", required=True)
    s = sub.add_parser("serve", help="serve a domain's tools over MCP (stdio, or streamable HTTP with --port)",
                       description=__doc__.strip(), formatter_class=p.formatter_class)
    s.add_argument("--domain", required=True, choices=["medicine", "education"], help="whose tools to serve")
    s.add_argument("--port", type=int, metavar="N",
                   help="serve streamable HTTP on this port (path /mcp) instead of stdio")
    s.add_argument("--host", default="127.0.0.1", help="address for --port (default 127.0.0.1: this machine only)")


def run(args):
    if args.mcp_command != "serve":
        raise UserError(f"mcp: unknown subcommand {args.mcp_command!r}")
    if args.port is not None and not 0 < args.port < 65536:
        raise UserError(f"--port: must be 1..65535, got {args.port}")
    server = domain_server(args.domain, host=args.host, port=args.port or 8000)
    if args.port is None:
        server.run("stdio")
    else:
        import sys

        print(f"ossforge {args.domain} MCP server: http://{args.host}:{args.port}/mcp", file=sys.stderr, flush=True)
        server.run("streamable-http")
    return 0
