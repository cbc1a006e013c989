"""Domain datasets: shipped generators (medicine, education) and loaders for public formats.

``generate(domain, split, n, seed)`` returns dataset rows (DESIGN §3); ``write_domain`` writes
``train.jsonl`` and ``heldout.jsonl``. ``python -m ossforge.finetune.domains medicine --out
data/medicine`` regenerates the shipped files byte for byte.
"""

from __future__ import annotations

from pathlib import Path

from ossforge.finetune.domains import education, medicine
from ossforge.finetune.domains.common import write_jsonl

DOMAINS = {"medicine": medicine, "education": education}
# Shipped sizes: (train rows, held-out rows).
SIZES = {"medicine": (480, 50), "education": (400, 50)}


def generate(domain: str, split: str, n: int, seed: int = 0) -> list[dict]:
    if domain not in DOMAINS:
        raise KeyError(f"unknown domain {domain!r} (choose from {', '.join(sorted(DOMAINS))})")
    if split not in ("train", "heldout"):
        raise KeyError(f"unknown split {split!r} (train or heldout)")
    return DOMAINS[domain].generate(split, n, seed)


def write_domain(domain: str, out_dir: str | Path, seed: int = 0, n_train: int | None = None,
                 n_heldout: int | None = None) -> dict[str, int]:
    """Write ``train.jsonl`` and ``heldout.jsonl`` for a domain; returns row counts per file."""
    default_train, default_heldout = SIZES[domain]
    out = Path(out_dir)
    counts = {}
    for split, n in (("train", n_train or default_train), ("heldout", n_heldout or default_heldout)):
        counts[f"{split}.jsonl"] = write_jsonl(out / f"{split}.jsonl", generate(domain, split, n, seed))
    return counts


# The tools each domain's rows use (the agents layer serves them; the functions compute results).
TOOLS = {"medicine": medicine.TOOLS, "education": education.TOOLS}
TOOL_FUNCTIONS = {"dose_calc": medicine.dose_calc, "check_step": education.check_step}
