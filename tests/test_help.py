"""Every ``--help`` teaches in plain words: no code markup, no internal names, defaults shown."""

from __future__ import annotations

import argparse
import re

import pytest

from ossforge.cli import build_parser

# Words that only mean something to someone reading the source.
INTERNAL = re.compile(r"``|:class:|:func:|:mod:|DESIGN|§|TransformersBackend|parse_completion|ParamWrapper|"
                      r"HarmonyContinuation|merge_and_unload|fuse_moe'd|_experts_implementation|compute_loss")


def _all_parsers(parser, prefix=("ossforge",)):
    yield " ".join(prefix), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _all_parsers(child, prefix + (name,))


PARSERS = dict(_all_parsers(build_parser()))


def test_every_command_has_help():
    names = set(PARSERS)
    for command in ("train", "data check", "data render", "plan", "eval", "merge", "chat", "mcp serve",
                    "bench moe", "bench train", "demo"):
        assert f"ossforge {command}" in names


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_is_plain_and_shows_defaults(name):
    parser = PARSERS[name]
    text = parser.format_help()
    assert not INTERNAL.search(text), (name, INTERNAL.search(text).group(0))
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.option_strings[0]}: no help text"
        default = action.default
        if not (default is None or default is False or default == [] or default is argparse.SUPPRESS):
            assert str(default) in parser._get_formatter()._expand_help(action) or "default" in action.help.lower(), \
                f"{name} {action.option_strings[0]}: default {default!r} not shown"
