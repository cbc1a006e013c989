"""Regenerate a shipped domain dataset, or convert a local public-format file.

    python -m ossforge.finetune.domains medicine --out data/medicine [--seed S] [--train N] [--heldout N]
    python -m ossforge.finetune.domains convert medmcqa dev.json --out medmcqa.jsonl [--limit N]
    python -m ossforge.finetune.domains convert bfcl BFCL_v3_simple.json --answers possible_answer/BFCL_v3_simple.json --out bfcl.jsonl
"""

from __future__ import annotations

import argparse
import sys

from ossforge.errors import UserError
from ossforge.finetune.domains import DOMAINS, write_domain


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ossforge.finetune.domains", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    for name in sorted(DOMAINS):
        d = sub.add_parser(name, help=f"regenerate the {name} train/held-out JSONL (deterministic)")
        d.add_argument("--out", required=True, help="output folder (train.jsonl, heldout.jsonl)")
        d.add_argument("--seed", type=int, default=0)
        d.add_argument("--train", type=int, default=None, help="training rows (default: shipped size)")
        d.add_argument("--heldout", type=int, default=None, help="held-out rows (default: shipped size)")
    c = sub.add_parser("convert", help="convert a local MedMCQA/PubMedQA/GSM8K/BFCL file to dataset rows")
    c.add_argument("format", choices=["medmcqa", "pubmedqa", "gsm8k", "bfcl"])
    c.add_argument("input", help="local file (JSON, JSON lines, parquet) or saved dataset folder")
    c.add_argument("--out", required=True, help="output JSONL")
    c.add_argument("--limit", type=int, default=None, help="convert only the first N records")
    c.add_argument("--answers", default=None, help="bfcl: the matching possible_answer file")
    args = p.parse_args(argv)
    try:
        if args.what == "convert":
            from ossforge.finetune.domains.loaders import convert

            extra = {"answers": args.answers} if args.format == "bfcl" else {}
            n = convert(args.format, args.input, args.out, limit=args.limit, **extra)
            print(f"{args.out}: {n} rows", file=sys.stderr)
            return 0
        counts = write_domain(args.what, args.out, args.seed, args.train, args.heldout)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return UserError.exit_code
    for name, n in counts.items():
        print(f"{args.out}/{name}: {n} rows", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
