"""Count host reads of tensor values (what is a device sync on a GPU) while a block runs, on CPU.

Every ``Tensor.item``/``tolist``/``cpu``/``numpy`` and every conversion to a Python scalar
(``float(t)``, ``int(t)``, ``bool(t)``, ``f"{t:.3f}"``) is recorded with the file and line that
asked for it, so a test can tell ossforge's own reads from DeepSpeed's or torch's.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OURS = tuple(str(REPO / d) for d in ("finetune", "model", "kernels", "ossforge"))
METHODS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "__format__")


class HostSyncs:
    """``with HostSyncs() as s: ...``; then ``s.ours`` / ``s.total`` and ``s.sites`` (file:line -> count)."""

    def __init__(self):
        self.sites: Counter[str] = Counter()
        self._saved = {}

    def __enter__(self):
        for name in METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)

    def _wrap(self, name, original):
        counter = self

        def wrapper(tensor, *args, **kwargs):
            frame = sys._getframe(1)
            counter.sites[f"{frame.f_code.co_filename}:{frame.f_lineno}:{name}"] += 1
            return original(tensor, *args, **kwargs)

        return wrapper

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    @property
    def ours(self) -> int:
        return sum(n for site, n in self.sites.items() if site.startswith(OURS))

    def our_sites(self) -> dict[str, int]:
        return {site: n for site, n in self.sites.items() if site.startswith(OURS)}
