"""One rank of ``ossforge train`` whose run folder is per rank (``output_dir=OUT/node<RANK>``): two ranks
standing in for two nodes without a shared filesystem. Started by the DeepSpeed launcher from
tests/test_shared_fs.py; writes what ``ossforge`` printed and returned, and how long it took, to
``OUT/rank<R>.json``.

    deepspeed --num_gpus 2 tests/shared_fs_worker.py CONFIG OUT
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from ossforge.cli import main  # noqa: E402
from ossforge.finetune.run_dir import RunDir  # noqa: E402

_check = RunDir.check_shared
CHECK_SECONDS = []


def _timed_check(self):
    """The real check, timed: the test asserts it fails fast instead of waiting out a collective."""
    start = time.perf_counter()
    try:
        return _check(self)
    finally:
        CHECK_SECONDS.append(time.perf_counter() - start)


RunDir.check_shared = _timed_check


def run() -> int:
    config, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][:2]
    rank = os.environ["RANK"]
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err):
        rc = main(["train", config, "--set", f"output_dir={out}/node{rank}"])
    record = {"rc": rc, "stderr": err.getvalue(), "seconds": time.perf_counter() - start, "check_seconds": CHECK_SECONDS}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    return rc


if __name__ == "__main__":
    sys.exit(run())
