"""Peak memory of every rank, for ``metrics.jsonl`` and the training summary.

Each rank reads its own high-water marks: host RSS from the kernel (``VmHWM`` in
``/proc/self/status``, or ``getrusage`` where there is no /proc) and device memory from
``torch.cuda.max_memory_allocated``, plus the file-backed share of host memory at log time. At log
time one small ``all_gather`` of three floats per rank collects them, so every rank holds the per-rank
values and their maximum. Peaks are since the
process started: they include the load-time peak, which is often the largest.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

GIB = 1024**3


def _proc_status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``RssFile``...) in bytes; None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def peak_host_bytes() -> int:
    """Peak resident set size of this process, in bytes."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def file_backed_bytes() -> int | None:
    """Resident file-backed pages of this process now (``RssFile``: shared libraries, mapped files), in
    bytes; None where there is no /proc. Part of the host peak that depends on the machine's page cache
    (how much of torch's libraries it maps), not on the run."""
    return _proc_status_bytes("RssFile")


def peak_device_bytes(device) -> int | None:
    """Peak memory the torch allocator handed out on ``device`` (None without a CUDA device)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated(device)


@dataclass
class MemoryPeaks:
    """Per-rank peaks in GiB (``device_gib`` entries are None on CPU)."""

    host_gib: list[float]
    device_gib: list[float | None]
    host_file_gib: list[float | None] | None = None  # file-backed share of host memory at log time

    @property
    def peak_host_gib(self) -> float:
        return max(self.host_gib)

    @property
    def peak_device_gib(self) -> float | None:
        values = [v for v in self.device_gib if v is not None]
        return max(values) if values else None

    def record(self) -> dict:
        """The ``metrics.jsonl`` fields (DESIGN §3): maxima over ranks, per-rank values in ``memory``."""
        return {"peak_host_gib": self.peak_host_gib, "peak_device_gib": self.peak_device_gib,
                "memory": {"host_gib": self.host_gib, "device_gib": self.device_gib,
                           "host_file_gib": self.host_file_gib or [None] * len(self.host_gib)}}

    def line(self) -> str:
        ranks = len(self.host_gib)
        per_rank = f" (per rank {', '.join(f'{v:.2f}' for v in self.host_gib)})" if ranks > 1 else ""
        device = self.peak_device_gib
        device_text = "no device" if device is None else f"device {device:.2f} GiB"
        over = f"max over {ranks} ranks" if ranks > 1 else "1 rank"
        return f"peak memory: host {self.peak_host_gib:.2f} GiB{per_rank}, {device_text} ({over})"


def gather_peaks(device) -> MemoryPeaks:
    """Every rank's peaks; a collective when torch.distributed is initialised (all ranks must call it)."""
    import torch
    import torch.distributed as dist

    device_bytes, file_bytes = peak_device_bytes(device), file_backed_bytes()
    mine = torch.tensor([peak_host_bytes() / GIB, -1.0 if device_bytes is None else device_bytes / GIB,
                         -1.0 if file_bytes is None else file_bytes / GIB], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        on = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
        mine = mine.to(on)
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
        rows = [p.cpu().tolist() for p in parts]
    else:
        rows = [mine.tolist()]
    return MemoryPeaks(host_gib=[round(h, 3) for h, _, _ in rows],
                       device_gib=[None if d < 0 else round(d, 3) for _, d, _ in rows],
                       host_file_gib=[None if f < 0 else round(f, 3) for _, _, f in rows])
