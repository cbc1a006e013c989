"""Domain assistants: each module gives a system prompt, a tool registry and its guard rails."""

from __future__ import annotations

DOMAINS = ("medicine", "education")


def load(domain: str):
    """The domain module (``SYSTEM_PROMPT``, ``DISCLAIMER``, ``registry()``); ValueError if unknown."""
    if domain == "medicine":
        from ossforge.agents.domains import medicine as mod
    elif domain == "education":
        from ossforge.agents.domains import education as mod
    else:
        raise ValueError(f"unknown domain {domain!r} (choose from {', '.join(DOMAINS)})")
    return mod
