"""The domain assistants on LangChain's ``create_agent`` (``langchain`` 1.x), guard rails as middleware.

``Agent`` (``ossforge.agents.loop``) is ossforge's own loop; this module gives the same assistant to
code built on LangChain's agent graph (checkpointers, streaming modes, other middleware)::

    from ossforge.agents.langchain_agent import create_domain_agent
    graph = create_domain_agent("medicine", llm, approve=lambda name, args: True)
    graph.invoke({"messages": [{"role": "user", "content": "Dose for 18 kg at 15 mg/kg?"}]})

:class:`GuardRails` carries the rules ``Agent`` enforces: each tool call runs through the
:class:`ToolRegistry` (argument validation, the tool's timeout, approval for risky tools; failures
become error ToolMessages the model can read), the red-flag notice goes before the final answer
and the disclaimer after it. Model- and tool-call limits are LangChain's own
``ModelCallLimitMiddleware`` / ``ToolCallLimitMiddleware``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from langchain.agents.middleware import AgentMiddleware, ModelCallLimitMiddleware, ToolCallLimitMiddleware
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from ossforge.agents.convert import text_of
from ossforge.agents.tools import ToolRegistry


class GuardRails(AgentMiddleware):
    """create_agent middleware: registry policy for each tool call, notices and disclaimer on the answer."""

    def __init__(self, registry: ToolRegistry, *, approve: Callable[[str, dict], Any] | None = None,
                 pre_check: Callable[[str], list[str]] | None = None, disclaimer: str = ""):
        super().__init__()
        self.registry = registry
        self.approve = approve or (lambda name, args: False)
        self.pre_check = pre_check
        self.disclaimer = disclaimer

    # ------------------------------------------------------------ tools

    def _refusal(self, call: dict) -> ToolMessage | None:
        name = call["name"]
        if name not in self.registry:
            return _error(call, f"unknown tool {name!r}; available tools: {', '.join(self.registry.names())}")
        return None

    def wrap_tool_call(self, request, handler):
        call = request.tool_call
        refusal = self._refusal(call)
        if refusal is not None:
            return refusal
        args = call.get("args") or {}
        if self.registry[call["name"]].requires_approval and not bool(self.approve(call["name"], args)):
            return _error(call, "the user did not approve this tool call")
        try:
            return ToolMessage(self.registry.run(call["name"], args), tool_call_id=call["id"], name=call["name"])
        except Exception as exc:  # validation, ToolException, ToolTimeout: back to the model
            return _error(call, f"{type(exc).__name__}: {_first_line(exc)}")

    async def awrap_tool_call(self, request, handler):
        call = request.tool_call
        refusal = self._refusal(call)
        if refusal is not None:
            return refusal
        args = call.get("args") or {}
        if self.registry[call["name"]].requires_approval:
            ok = self.approve(call["name"], args)
            if not bool(await ok if inspect.isawaitable(ok) else ok):
                return _error(call, "the user did not approve this tool call")
        try:
            result = await self.registry.arun(call["name"], args)
            return ToolMessage(result, tool_call_id=call["id"], name=call["name"])
        except Exception as exc:
            return _error(call, f"{type(exc).__name__}: {_first_line(exc)}")

    # ------------------------------------------------------------ answer

    def after_agent(self, state, runtime) -> dict[str, Any] | None:
        messages = state["messages"]
        last = messages[-1] if messages else None
        if not isinstance(last, AIMessage) or last.tool_calls:
            return None
        user = next((m for m in reversed(messages) if isinstance(m, HumanMessage)), None)
        notices = list(self.pre_check(text_of(user.content))) if (self.pre_check and user is not None) else []
        answer = text_of(last.content)
        if self.disclaimer and self.disclaimer not in answer:
            answer = f"{answer}\n\n{self.disclaimer}" if answer else self.disclaimer
        if notices:
            answer = "\n\n".join([*notices, answer])
        if answer == text_of(last.content):
            return None
        return {"messages": [last.model_copy(update={"content": answer})]}  # same id: replaces the answer

    async def aafter_agent(self, state, runtime) -> dict[str, Any] | None:
        return self.after_agent(state, runtime)


def _error(call: dict, text: str) -> ToolMessage:
    return ToolMessage(f"error: {text}", tool_call_id=call["id"], name=call["name"], status="error")


def _first_line(exc: BaseException) -> str:
    return " ".join((str(exc).strip() or type(exc).__name__).split())[:400]


def create_domain_agent(domain: str, llm, *, approve: Callable[[str, dict], Any] | None = None,
                        compact: bool = False, max_model_calls: int = 8, max_tool_calls: int = 12,
                        registry: ToolRegistry | None = None, **create_agent_kwargs):
    """The medicine or education assistant as a ``langchain.agents.create_agent`` graph.

    ``registry`` replaces the domain's tools (e.g. the same tools loaded from ``ossforge mcp serve``
    with :func:`ossforge.agents.mcp_client.amcp_registry`); ``compact`` as in
    :func:`ossforge.agents.loop.build_domain_agent`. Extra keyword arguments go to ``create_agent``
    (``checkpointer``, ``middleware`` added after the guard rails, ...).
    """
    import importlib

    from langchain.agents import create_agent

    from ossforge.agents.domains import load

    mod = load(domain)
    tools, system_prompt = mod.registry(), mod.SYSTEM_PROMPT
    if compact:
        trained = {"medicine": ["dose_calc"], "education": ["check_step"]}[domain]
        tools = ToolRegistry([tools[name] for name in trained])
        system_prompt = importlib.import_module(f"ossforge.finetune.domains.{domain}").SYSTEM
    tools = registry if registry is not None else tools
    pre_check = None
    if domain == "medicine":
        def pre_check(text: str) -> list[str]:
            flags = mod.red_flags(text)
            return [mod.ESCALATION.format(flags=", ".join(flags))] if flags else []
    middleware = [GuardRails(tools, approve=approve, pre_check=pre_check, disclaimer=mod.DISCLAIMER),
                  ModelCallLimitMiddleware(run_limit=max_model_calls, exit_behavior="end"),
                  ToolCallLimitMiddleware(run_limit=max_tool_calls, exit_behavior="end"),
                  *create_agent_kwargs.pop("middleware", [])]
    return create_agent(llm, tools.tools(), system_prompt=system_prompt, middleware=middleware,
                        **create_agent_kwargs)
