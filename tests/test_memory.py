"""Per-rank peak memory (finetune/memory.py): the kernel's high-water mark, gathered over gloo ranks."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from ossforge.finetune.memory import GIB, MemoryPeaks, gather_peaks, peak_host_bytes


def test_peak_host_rss_follows_a_real_allocation():
    before = peak_host_bytes()
    big = torch.ones(384 * 1024**2 // 4)  # 384 MiB, every page touched
    after = peak_host_bytes()
    del big
    assert after - before >= 300 * 1024**2 or before > 2 * 384 * 1024**2  # grew, unless an earlier peak covers it
    assert peak_host_bytes() >= after - 16 * 1024**2  # a high-water mark (kernel counters lag by a few pages)


def _rank(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    extra = torch.ones((1 + 700 * rank) * 1024**2 // 4)  # rank 1 holds ~700 MiB more than rank 0
    peaks = gather_peaks(torch.device("cpu"))
    queue.put((rank, peaks.record(), peak_host_bytes() / GIB))
    del extra
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_ranks_gather_per_rank_peaks_and_their_max():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (rec, own)) for r, rec, own in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    rec0, rec1 = results[0][0], results[1][0]
    assert rec0 == rec1  # every rank holds the same gathered values
    host = rec0["memory"]["host_gib"]
    assert len(host) == 2 and host[1] - host[0] > 0.5  # rank 1's extra 700 MiB shows in its own entry
    assert rec0["peak_host_gib"] == max(host) == host[1]
    assert host[1] == pytest.approx(results[1][1], abs=0.01)
    assert rec0["peak_device_gib"] is None and rec0["memory"]["device_gib"] == [None, None]
    assert all(0 < f < h for f, h in zip(rec0["memory"]["host_file_gib"], host))  # libraries: part of RSS


def test_summary_line():
    peaks = MemoryPeaks(host_gib=[1.5, 2.25], device_gib=[None, None])
    assert peaks.line() == "peak memory: host 2.25 GiB (per rank 1.50, 2.25), no device (max over 2 ranks)"
    gpu = MemoryPeaks(host_gib=[3.0], device_gib=[40.5])
    assert gpu.record()["peak_device_gib"] == 40.5 and "device 40.50 GiB" in gpu.line()
