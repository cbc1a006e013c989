"""Agents: a langchain-core chat model over harmony, tools, the agent loop, domain assistants.

``from ossforge.agents import ChatGptOss, ScriptedBackend, TransformersBackend, OpenAICompatibleBackend``
(imported lazily, so ``ossforge --help`` never loads langchain).
"""

_EXPORTS = {
    "ChatGptOss": "ossforge.agents.chat_model",
    "ScriptedBackend": "ossforge.agents.backends",
    "TransformersBackend": "ossforge.agents.backends",
    "OpenAICompatibleBackend": "ossforge.agents.backends",
    "BackendError": "ossforge.agents.backends",
    "parse_completion": "ossforge.agents.parsing",
    "ToolRegistry": "ossforge.agents.tools",
    "Agent": "ossforge.agents.loop",
    "AgentLimits": "ossforge.agents.loop",
    "create_domain_agent": "ossforge.agents.langchain_agent",
    "mcp_registry": "ossforge.agents.mcp_client",
    "amcp_registry": "ossforge.agents.mcp_client",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
