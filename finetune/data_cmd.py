"""Check or render a harmony dataset (JSONL, parquet or a saved dataset folder).

  ossforge data check FILE                       every bad row as FILE:LINE: reason (exit 2 if any)
  ossforge data render FILE --out OUT.jsonl      one {"input_ids": [...], "labels": [...]} per line
  ossforge data render FILE --out OUT.jsonl --config CONFIG   seq_len / drop_analysis / packing from CONFIG
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ossforge import atomic
from ossforge.errors import UserError


def add_arguments(p):
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    check = sub.add_parser("check", help="validate a dataset; report every bad row as FILE:LINE: reason")
    check.add_argument("file", metavar="FILE", help="JSONL / parquet file or dataset folder")
    render = sub.add_parser("render", help="write the exact training tokens and labels of a dataset as JSONL")
    render.add_argument("file", metavar="FILE", help="JSONL / parquet file or dataset folder")
    render.add_argument("--out", required=True, metavar="OUT.jsonl", help="output file (written atomically)")
    render.add_argument("--config", metavar="CONFIG",
                        help="take training.seq_len, data.drop_analysis and data.packing from this config "
                             "(without it: no truncation, analysis kept, no packing)")
    p.set_defaults(_data_parser=p)


def run(args) -> int:
    if args.data_command == "check":
        return _check(args.file)
    if args.data_command == "render":
        return _render(args.file, args.out, args.config)
    args._data_parser.print_help(sys.stderr)
    return 2


def _check(file: str) -> int:
    from ossforge.finetune import data

    good, problems = data.validate_rows(file)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        print(f"{file}: {len(problems)} bad rows, {len(good)} OK", file=sys.stderr)
        return 2
    if not good:
        raise UserError(f"{file}: no rows")
    _, stats = data.examples_from_rendered([r.rendered for r in good], None)
    print(f"{file}: {len(good)} rows OK")
    print(f"tokens: {stats.tokens} total, {stats.trained_tokens} trained, "
          f"longest row {stats.longest_row}, mean {stats.tokens / max(stats.rows, 1):.1f} per row")
    return 0


def _render(file: str, out: str, config_path: str | None) -> int:
    from ossforge.finetune import data

    seq_len, drop_analysis, packing = None, False, False
    if config_path:
        from ossforge.finetune.config import load_config

        config = load_config(config_path, check_files=False)
        seq_len = config.training.seq_len
        drop_analysis, packing = config.data.drop_analysis, config.data.packing
    examples, stats = data.build_examples(file, seq_len, drop_analysis=drop_analysis, packing=packing)

    out_path = Path(out)
    if out_path.is_dir():
        raise UserError(f"{out}: --out is a directory; give a file name")
    with atomic.open_file(out_path) as f:  # readers never see half a file
        for ex in examples:
            f.write(json.dumps({"input_ids": ex["input_ids"], "labels": ex["labels"]}) + "\n")
    print(f"{out}: {stats.summary()}")
    return 0
