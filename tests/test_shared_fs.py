"""Multi-node correctness: a rank that cannot see the run folder rank 0 writes stops every rank with one
line and exit 2, within seconds, instead of hanging in a collective later."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ranks_without_a_shared_run_folder_all_exit_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_free_port()),
           "tests/shared_fs_worker.py", "configs/medicine-tiny.yaml", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        lines = record["stderr"].strip().splitlines()
        assert record["rc"] == 2 and len(lines) == 1, record
        assert lines[0].startswith(f"error: {tmp_path}/node{rank}: output_dir: ranks [1] cannot see the file rank 0 wrote")
        assert f"this is rank {rank}" in lines[0] and "filesystem all nodes share" in lines[0]
        assert len(record["check_seconds"]) == 1 and record["check_seconds"][0] < 10, record  # no collective timeout
    assert not (tmp_path / "node0" / "base").exists() and not (tmp_path / "node1").exists()
