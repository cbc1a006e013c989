"""Keep ``deepspeed.initialize`` from broadcasting the frozen base weights.

At start-up the DeepSpeed engine broadcasts every parameter from rank 0 (``DeepSpeedEngine._broadcast_model``,
0.19.8), frozen ones included, as ``p.data.view(torch.uint8)``. For a LoRA run that is pure waste: the frozen
base is loaded (or seeded) identically on every rank, from the same folder, and only LoRA trains. It is worse
for MXFP4-resident experts: ``view`` on an ``MXFP4Tensor`` runs on a dense dequantised temporary, one per
expert weight (GBs per layer on gpt-oss-120b), and what a rank receives into it is thrown away.

DeepSpeed has no switch for it. Its broadcast skips parameters carrying ``ds_optim_param`` (its marker
for ``OptimizedLinear`` weights, "unique per base weight shard"), and nothing else in a ZeRO-0/1/2 engine
reads that marker unless ``OptimizedLinear`` modules exist. So the frozen parameters carry it while the
engine starts, and lose it again right after. ``tests/test_deepspeed_api.py`` checks that DeepSpeed still
honours it.
"""

from __future__ import annotations

import contextlib

import torch

MARKER = "ds_optim_param"


@contextlib.contextmanager
def frozen_weights_not_broadcast(model: torch.nn.Module):
    """Inside: DeepSpeed's start-up broadcast leaves ``model``'s frozen parameters alone (LoRA still goes)."""
    marked = [p for p in model.parameters() if not p.requires_grad and not hasattr(p, MARKER)]
    for p in marked:
        setattr(p, MARKER, True)
    try:
        yield marked
    finally:
        for p in marked:
            delattr(p, MARKER)
