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

Skipping it means trusting that every rank holds the same base, so :func:`check_frozen_weights_agree`
checks that instead, from one float64 sum per replicated base tensor (a few kilobytes on the wire).
"""

from __future__ import annotations

import contextlib

import torch

from ossforge.errors import UserError

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


def _replicated(name: str) -> bool:
    """Tensors every rank holds whole: all but the experts, which expert parallelism splits."""
    return ".mlp.experts." not in name


def _float64_sum(t: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """Sum in float64 through 512 KiB temporaries (``sum(dtype=float64)`` casts the whole input first:
    4.6 GB for gpt-oss-120b's embedding)."""
    flat = t.reshape(-1)
    return torch.stack([c.sum(dtype=torch.float64) for c in flat.split(chunk)]).sum()


def check_frozen_weights_agree(model: torch.nn.Module) -> None:
    """A clear error, on every rank, when some rank's base ``model`` (before LoRA) differs from rank 0's.

    Without DeepSpeed's start-up broadcast, ranks that loaded different folders (a node-local copy that
    differs, a re-download mid-launch) would train on different bases, silently. Each replicated
    tensor is reduced to its float64 sum; sums of one tensor on different devices may differ in the last
    bits, different checkpoints do not agree to 1e-6.
    """
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    names, sums = [], []
    for name, p in model.named_parameters():
        if _replicated(name):
            names.append(name)
            sums.append(_float64_sum(p.detach()))
    mine = torch.stack(sums)
    if dist.get_backend() != "nccl":
        mine = mine.cpu()  # gloo gathers host tensors
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)  # one sync at start-up
    reference = gathered[0].cpu()
    for rank, theirs in enumerate(gathered[1:], start=1):
        close = torch.isclose(theirs.cpu(), reference, rtol=1e-6, atol=1e-6)
        if not bool(close.all()):
            first = names[int((~close).nonzero()[0])]
            raise UserError(f"rank {rank}'s frozen base differs from rank 0's (first: {first}): every rank "
                            "must load the same model folder (or preset and model.init_seed)")
