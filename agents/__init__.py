"""Agents: a langchain-core chat model over harmony, tools, the agent loop, domain assistants."""
