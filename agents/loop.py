"""The agent loop: model -> tool calls -> tool results -> model ... -> answer, within explicit limits.

A small loop over langchain-core messages (rather than a prebuilt graph) so every rule is visible:
- limits on model calls, tool calls and wall time, each ending the run with a stated reason;
- a malformed call (bad JSON, unknown tool, cut off) goes back to the model as an error
  ToolMessage, and the model may retry at most ``max_retries`` times;
- tool exceptions, bad arguments and timeouts become error ToolMessages, never crashes;
- tools flagged ``requires_approval`` run only if ``approve(name, args)`` says yes;
- ``arun`` is the same loop on the event loop; the independent tool calls of one model turn run
  concurrently there (tools may be async or MCP tools);
- every step goes to the trace (redacted JSONL) when one is given (``trace``: a Trace, a path or a
  stream; None, the default, traces nothing); the analysis channel reaches ``on_event`` only
  as ``reasoning`` events, which front ends show only when asked to.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage, ToolMessage

from ossforge.agents.tools import ToolRegistry
from ossforge.agents.trace import Trace, as_trace


@dataclass
class AgentLimits:
    max_model_calls: int = 8
    max_tool_calls: int = 12
    max_wall_s: float = 300.0
    max_retries: int = 2  # model turns with malformed tool calls before giving up


@dataclass
class AgentResult:
    answer: str  # what the end user sees (never the analysis channel)
    stopped: str  # final | model_call_limit | tool_call_limit | time_limit | retry_limit
    messages: list[BaseMessage]
    model_calls: int = 0
    tool_calls: int = 0
    notices: list[str] = field(default_factory=list)


LIMIT_MESSAGES = {
    "model_call_limit": "I could not finish: the agent reached its limit of model calls.",
    "tool_call_limit": "I could not finish: the agent reached its limit of tool calls.",
    "time_limit": "I could not finish: the agent ran out of time.",
    "retry_limit": "I could not finish: the model kept producing malformed tool calls.",
}

# Shown when the model's turn has no user-facing text: [not cut off, cut off by max_tokens].
NO_ANSWER = ["(no answer: the model's output did not follow the harmony format; it may need more training)",
             "(no answer: the model used all its tokens before answering; raise max_tokens)"]

Event = Callable[[str, Any], None]


class Agent:
    """A tool-using assistant around a chat model (usually :class:`ChatGptOss`).

    ``pre_check(user_text)`` may return notices shown before the answer (e.g. red-flag escalation);
    ``disclaimer`` is appended to every answer that does not already contain it.
    """

    def __init__(self, llm, registry: ToolRegistry, *, system_prompt: str | None = None,
                 limits: AgentLimits | None = None, approve: Callable[[str, dict], bool] | None = None,
                 trace: Trace | str | None = None, pre_check: Callable[[str], list[str]] | None = None,
                 disclaimer: str = "", stream: bool = False):
        self.registry = registry
        self.llm = llm.bind_tools(registry.tools()) if len(registry) else llm
        self.system_prompt = system_prompt
        self.limits = limits or AgentLimits()
        self.approve = approve or (lambda name, args: False)
        self.trace = as_trace(trace)  # None: nothing is recorded (private by default)
        self.pre_check = pre_check
        self.disclaimer = disclaimer
        self.stream = stream

    # ---------------------------------------------------------------- model

    def _call_model(self, messages: list[BaseMessage], on_event: Event | None) -> AIMessage:
        if not self.stream:
            return self._after_invoke(self.llm.invoke(messages), on_event)
        full: AIMessageChunk | None = None
        for chunk in self.llm.stream(messages):
            full = self._on_chunk(full, chunk, on_event)
        return self._after_stream(full)

    async def _acall_model(self, messages: list[BaseMessage], on_event: Event | None) -> AIMessage:
        if not self.stream:
            return self._after_invoke(await self.llm.ainvoke(messages), on_event)
        full: AIMessageChunk | None = None
        async for chunk in self.llm.astream(messages):
            full = self._on_chunk(full, chunk, on_event)
        return self._after_stream(full)

    @staticmethod
    def _after_invoke(msg: AIMessage, on_event: Event | None) -> AIMessage:
        if msg.response_metadata.get("invalid_tool_calls") and not msg.invalid_tool_calls:
            # invoke went through LangChain's streaming path (streaming=True or a streaming callback)
            meta = dict(msg.response_metadata)
            msg = msg.model_copy(update={"invalid_tool_calls": meta.pop("invalid_tool_calls"),
                                         "response_metadata": meta})
        if on_event:
            if msg.additional_kwargs.get("reasoning_content"):
                on_event("reasoning", msg.additional_kwargs["reasoning_content"])
            if msg.content:
                on_event("content", msg.content)
        return msg

    @staticmethod
    def _on_chunk(full: AIMessageChunk | None, chunk: AIMessageChunk, on_event: Event | None) -> AIMessageChunk:
        if on_event:
            if chunk.additional_kwargs.get("reasoning_content"):
                on_event("reasoning", chunk.additional_kwargs["reasoning_content"])
            if chunk.content:
                on_event("content", chunk.content)
        return chunk if full is None else full + chunk

    @staticmethod
    def _after_stream(full: AIMessageChunk | None) -> AIMessage:
        assert full is not None
        meta = dict(full.response_metadata)
        invalid = meta.pop("invalid_tool_calls", [])
        return AIMessage(content=full.content, additional_kwargs=full.additional_kwargs,
                         tool_calls=full.tool_calls, invalid_tool_calls=invalid,
                         response_metadata=meta, usage_metadata=full.usage_metadata, id=full.id)

    # ---------------------------------------------------------------- tools

    def _tool_start(self, call: dict, on_event: Event | None, approved: bool | None):
        """Checks before a tool runs: an error ToolMessage, or None when it may run."""
        name, args, call_id = call["name"], call.get("args") or {}, call["id"]
        if name not in self.registry:
            return self._tool_error(call_id, name, f"unknown tool {name!r}", on_event)
        if self.registry[name].requires_approval:
            self.trace.log("approval", tool=name, args=args, approved=bool(approved))
            if not approved:
                return self._tool_error(call_id, name, "the user did not approve this tool call", on_event)
        return None

    def _tool_done(self, call: dict, result: str | None, exc: Exception | None, on_event: Event | None) -> ToolMessage:
        name, args, call_id = call["name"], call.get("args") or {}, call["id"]
        if exc is not None:  # validation errors, ToolException, ToolTimeout, bugs: all go back to the model
            return self._tool_error(call_id, name, f"{type(exc).__name__}: {_first_line(exc)}", on_event)
        self.trace.log("tool_result", tool=name, args=args, result=result, status="success")
        if on_event:
            on_event("tool_result", {"name": name, "content": result, "status": "success"})
        return ToolMessage(result, tool_call_id=call_id, name=name, status="success")

    def _needs_approval(self, call: dict) -> bool:
        return call["name"] in self.registry and self.registry[call["name"]].requires_approval

    def _run_tool(self, call: dict, on_event: Event | None) -> ToolMessage:
        if on_event:
            on_event("tool_call", {"name": call["name"], "args": call.get("args") or {}})
        approved = bool(self.approve(call["name"], call.get("args") or {})) if self._needs_approval(call) else None
        early = self._tool_start(call, on_event, approved)
        if early is not None:
            return early
        try:
            return self._tool_done(call, self.registry.run(call["name"], call.get("args") or {}), None, on_event)
        except Exception as exc:
            return self._tool_done(call, None, exc, on_event)

    async def _approval(self, call: dict) -> bool | None:
        if not self._needs_approval(call):
            return None
        answer = self.approve(call["name"], call.get("args") or {})  # may be a coroutine function
        return bool(await answer) if inspect.isawaitable(answer) else bool(answer)

    async def _arun_tool(self, call: dict, on_event: Event | None, approved: bool | None) -> ToolMessage:
        early = self._tool_start(call, on_event, approved)
        if early is not None:
            return early
        try:
            return self._tool_done(call, await self.registry.arun(call["name"], call.get("args") or {}), None, on_event)
        except Exception as exc:
            return self._tool_done(call, None, exc, on_event)

    async def _arun_tools(self, calls: list[dict], on_event: Event | None) -> list[ToolMessage]:
        """Calls of one model turn are independent (none sees another's result), so they run
        concurrently; results keep the calls' order. Calls needing approval are asked one at a time
        first, so prompts to the user never interleave."""
        approvals = []
        for call in calls:
            if on_event:
                on_event("tool_call", {"name": call["name"], "args": call.get("args") or {}})
            approvals.append(await self._approval(call))
        return list(await asyncio.gather(*(self._arun_tool(c, on_event, ok) for c, ok in zip(calls, approvals))))

    def _tool_error(self, call_id, name, error: str, on_event: Event | None) -> ToolMessage:
        text = f"error: {error}"
        self.trace.log("tool_result", tool=name, result=text, status="error")
        if on_event:
            on_event("tool_result", {"name": name, "content": text, "status": "error"})
        return ToolMessage(text, tool_call_id=call_id, name=name or "unknown", status="error")

    # ---------------------------------------------------------------- loop

    def run(self, user_input: str, history: Sequence[BaseMessage] = (), on_event: Event | None = None) -> AgentResult:
        """Answer one user turn. ``history`` holds earlier turns (without the system prompt)."""
        steps = self._steps(user_input, history, on_event)
        request = next(steps)
        try:
            while True:
                kind, payload, deadline = request
                if kind == "model":
                    reply: Any = self._call_model(payload, on_event)
                else:  # tools, one after another, as long as time is left
                    reply = []
                    for call in payload:
                        if time.monotonic() > deadline:
                            break
                        reply.append(self._run_tool(call, on_event))
                request = steps.send(reply)
        except StopIteration as done:
            return done.value

    async def arun(self, user_input: str, history: Sequence[BaseMessage] = (),
                   on_event: Event | None = None) -> AgentResult:
        """:meth:`run` on the event loop: ``ainvoke``/``astream`` for the model, ``ainvoke`` for tools
        (so MCP tools work), the independent calls of one turn concurrently."""
        steps = self._steps(user_input, history, on_event)
        request = next(steps)
        try:
            while True:
                kind, payload, deadline = request
                if kind == "model":
                    reply: Any = await self._acall_model(payload, on_event)
                else:
                    try:
                        reply = await asyncio.wait_for(self._arun_tools(payload, on_event),
                                                       timeout=max(deadline - time.monotonic(), 0.001))
                    except asyncio.TimeoutError:
                        reply = []
                request = steps.send(reply)
        except StopIteration as done:
            return done.value

    def _steps(self, user_input: str, history: Sequence[BaseMessage], on_event: Event | None):
        """The loop's rules, free of I/O: yields ``("model", messages, deadline)`` and
        ``("tools", calls, deadline)`` requests; :meth:`run` and :meth:`arun` answer them (an AIMessage,
        or one ToolMessage per call run before the deadline) and get the AgentResult at the end."""
        start = time.monotonic()
        lim = self.limits
        deadline = start + lim.max_wall_s
        messages: list[BaseMessage] = [SystemMessage(self.system_prompt)] if self.system_prompt else []
        messages += [*history, HumanMessage(user_input)]
        self.trace.log("user", content=user_input)
        notices = list(self.pre_check(user_input)) if self.pre_check else []
        for n in notices:
            self.trace.log("notice", content=n)
            if on_event:
                on_event("notice", n)
        model_calls = tool_calls = retries = 0
        stopped = None
        answer = ""
        while stopped is None:
            if time.monotonic() > deadline:
                stopped = "time_limit"
                break
            if model_calls >= lim.max_model_calls:
                stopped = "model_call_limit"
                break
            ai = yield ("model", messages, deadline)
            model_calls += 1
            messages.append(ai)
            self.trace.log("model", content=ai.content, reasoning=ai.additional_kwargs.get("reasoning_content", ""),
                           tool_calls=[{"name": c["name"], "args": c["args"]} for c in ai.tool_calls],
                           invalid_tool_calls=[{"name": c.get("name"), "args": c.get("args"), "error": c.get("error")}
                                               for c in ai.invalid_tool_calls],
                           finish_reason=ai.response_metadata.get("finish_reason"), usage=ai.usage_metadata,
                           harmony_error=ai.response_metadata.get("harmony_error"))
            if not ai.tool_calls and not ai.invalid_tool_calls:
                answer, stopped = (ai.content if isinstance(ai.content, str) else str(ai.content)), "final"
                if not answer.strip():
                    answer = NO_ANSWER[ai.response_metadata.get("finish_reason") == "length"
                                       and "harmony_error" not in ai.response_metadata]
                    if on_event:
                        on_event("content", answer)
                break
            if ai.invalid_tool_calls:
                retries += 1
                for bad in ai.invalid_tool_calls:
                    hint = f"; available tools: {', '.join(self.registry.names())}" if self.registry.names() else ""
                    if on_event:
                        on_event("invalid_tool_call", bad)
                    messages.append(self._tool_error(bad.get("id"), bad.get("name"),
                                                     f"{bad.get('error')}{hint}. Fix the call and try again.", None))
                if retries > lim.max_retries:
                    stopped = "retry_limit"
                    break
            calls = list(ai.tool_calls)
            allowed = calls[:max(lim.max_tool_calls - tool_calls, 0)]
            if allowed:
                results = yield ("tools", allowed, deadline)
                messages.extend(results)
                tool_calls += len(results)
                if len(results) < len(allowed):
                    stopped = "time_limit"
            if stopped is None and len(allowed) < len(calls):
                stopped = "tool_call_limit"
        if stopped != "final":
            answer = LIMIT_MESSAGES[stopped]
            if on_event:
                on_event("content", answer)
        if self.disclaimer and self.disclaimer not in answer:
            if on_event:
                on_event("content", "\n\n" + self.disclaimer)
            answer = f"{answer}\n\n{self.disclaimer}" if answer else self.disclaimer
        if notices:
            answer = "\n\n".join([*notices, answer])
        self.trace.log("answer", content=answer, stopped=stopped, model_calls=model_calls, tool_calls=tool_calls)
        return AgentResult(answer, stopped, messages, model_calls, tool_calls, notices)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = text.splitlines()
    return " ".join(lines[:3])[:400]


def build_domain_agent(domain: str, llm, *, compact: bool = False, **kwargs) -> Agent:
    """The medicine or education assistant around ``llm`` (system prompt, tools, guard rails).

    ``compact``: the short system prompt and the single tool of the shipped training data
    (``ossforge.finetune.domains``), for small models tuned only on those rows (the quickstart).
    The guard rails (red flags, disclaimer) stay on either way.
    """
    import importlib

    from ossforge.agents.domains import load
    from ossforge.agents.tools import ToolRegistry

    mod = load(domain)
    registry, system_prompt = mod.registry(), mod.SYSTEM_PROMPT
    if compact:
        data_mod = importlib.import_module(f"ossforge.finetune.domains.{domain}")
        trained = {"medicine": ["dose_calc"], "education": ["check_step"]}[domain]
        registry = ToolRegistry([registry[name] for name in trained])
        system_prompt = data_mod.SYSTEM
    pre_check = None
    if domain == "medicine":
        def pre_check(text: str) -> list[str]:
            flags = mod.red_flags(text)
            return [mod.ESCALATION.format(flags=", ".join(flags))] if flags else []
    return Agent(llm, registry, system_prompt=system_prompt, pre_check=pre_check,
                 disclaimer=mod.DISCLAIMER, **kwargs)
