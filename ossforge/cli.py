"""``ossforge`` command line.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
Those modules keep heavy imports (torch, transformers) inside ``run`` so ``--help`` stays fast.
User mistakes raise :class:`ossforge.errors.UserError` and become ``error: ...`` with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ossforge.errors import UserError
from ossforge.help import DESCRIPTIONS, SUB_DESCRIPTIONS, HelpFormatter

# name -> (module, one-line help). Order is the order shown by --help.
COMMANDS = {
    "train": ("ossforge.finetune.train_cmd", "fine-tune a gpt-oss model with LoRA from a YAML config"),
    "data": ("ossforge.finetune.data_cmd", "check or render a harmony dataset"),
    "plan": ("ossforge.finetune.plan", "estimate per-GPU memory and the EP x DP layout of a config"),
    "eval": ("ossforge.finetune.evaluate", "score a model (and adapter) on a config's domain eval sets"),
    "merge": ("ossforge.finetune.merge", "merge a LoRA adapter into its base and write an HF checkpoint"),
    "chat": ("ossforge.agents.chat_cli", "talk to a domain assistant in the terminal"),
    "mcp": ("ossforge.agents.mcp_server", "serve a domain assistant's tools to other agents over MCP"),
    "bench": ("ossforge.kernels.bench", "benchmark the MoE layer or whole training steps against transformers + peft"),
    "demo": ("ossforge.finetune.demo", "show what a trained run does on a held-out prompt"),
}

EPILOG = """\
examples:
  ossforge train configs/quickstart.yaml                 # tiny model, CPU, a few minutes
  ossforge train configs/quickstart.yaml --set training.max_steps=20 --set lora.r=16
  ossforge train configs/medicine-120b-8xh100.yaml --nproc 8
  ossforge data check data/medicine/train.jsonl
  ossforge plan configs/medicine-120b-8xh100.yaml --gpus 8 --gpu-mem-gib 80
  ossforge chat --domain medicine --adapter runs/quickstart/adapter

user errors exit with code 2 and one line: error: <file>:<line or field>: <reason>
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ossforge",
        description="Fine-tune gpt-oss MoE reasoning models into domain variants and run them as tool-using agents.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=DESCRIPTIONS.get(name, help_text),
                           formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
        _plain_help(p, name)
    return parser


def _plain_help(parser: argparse.ArgumentParser, command: str) -> None:
    """Sub-subcommands (``data check``, ``bench moe``, ``mcp serve``) get the same formatter and, where
    their module's text is written for developers, a plain description."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                child.formatter_class = HelpFormatter
                child.description = SUB_DESCRIPTIONS.get((command, name), child.description)


def _version() -> str:
    from ossforge import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
