"""Fine-tune a gpt-oss model with LoRA from a YAML config.

The config is validated before anything is built or written. With --nproc or --hostfile the
job goes through the DeepSpeed launcher (one rank per process); otherwise it runs in this process.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set training.max_steps=20 (repeatable)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="ranks on this machine, started by the DeepSpeed launcher")
    p.add_argument("--hostfile", default=None, metavar="F",
                   help="DeepSpeed hostfile for multi-node runs (see README 'Multi-node')")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in output_dir")


def run(args: argparse.Namespace) -> int:
    from ossforge.finetune.config import load_config

    config = load_config(args.config, args.overrides)
    if args.nproc or args.hostfile:
        from ossforge.finetune.launch import launch

        return launch(args, config)
    from ossforge.finetune.trainer import train

    result = train(config, resume=args.resume, config_path=args.config)
    return 130 if result.interrupted else 0
