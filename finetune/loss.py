"""LM head + cross-entropy without the [tokens, vocab] fp32 logits (``training.loss``).

gpt-oss has a 201,088-token vocabulary: the logits of one trained token take ~0.8 MB in fp32, plus as
much again for their gradient. Three ways to compute the same summed loss and gradients:

- ``liger``: Liger's fused linear cross-entropy (``liger-kernel``, Triton, CUDA only): logits exist one
  chunk at a time inside the kernel, the gradient of the hidden states and of the head are formed there.
- ``chunked``: torch, any device: the trained tokens in chunks of :func:`chunk_tokens`, each chunk's
  loss under non-reentrant activation checkpointing, so a chunk's logits are freed after its loss and
  recomputed, one chunk at a time, in backward. Peak: one chunk of logits (~256 MiB fp32). Works with
  any head module (a LoRA-wrapped ``lm_head`` too).
- ``full``: the whole [tokens, vocab] logits at once (the stock path; reference).

``auto``: ``liger`` on CUDA when ``liger-kernel`` is installed and the head is a plain ``nn.Linear``,
``chunked`` otherwise.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSSES = ("auto", "liger", "chunked", "full")
CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk


def chunk_tokens(vocab_size: int) -> int:
    """Trained tokens per chunk of the ``chunked`` loss (333 at gpt-oss's vocabulary)."""
    return max(16, CHUNK_BYTES // (4 * vocab_size))


def has_liger() -> bool:
    """Whether liger-kernel is installed (found, not imported: it is imported only where it runs, on CUDA)."""
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_loss(choice: str, device: torch.device | str, head=None) -> str:
    """The implementation ``choice`` runs as on ``device`` (``auto`` resolved; ``liger`` checked)."""
    device = torch.device(device)
    # Liger reads head.weight itself: a plain Linear whose weight is whole (not LoRA, not a ZeRO-3 shard)
    plain_head = head is None or (type(head) is torch.nn.Linear and not hasattr(head.weight, "ds_id"))
    if choice == "auto":
        return "liger" if device.type == "cuda" and plain_head and has_liger() else "chunked"
    if choice == "liger":
        from ossforge.errors import UserError

        if device.type != "cuda":
            raise UserError("training.loss: liger needs a CUDA device (Triton kernels); use auto or chunked")
        if not has_liger():
            raise UserError("training.loss: liger needs the liger-kernel package (pip install liger-kernel)")
        if not plain_head:
            raise UserError("training.loss: liger needs a plain lm_head (not LoRA-wrapped); use chunked")
    if choice not in LOSSES:
        raise ValueError(f"unknown loss implementation {choice!r}")
    return choice


def _summed_ce(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_lm_loss(head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` [N, V] against ``targets`` [N], one chunk of logits at a time."""
    chunk = chunk or chunk_tokens(head.weight.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_summed_ce, head, h, t, use_reentrant=False)
        else:
            total = total + _summed_ce(head, h, t)
    return total


def liger_lm_loss(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy through Liger's fused linear cross-entropy (CUDA)."""
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return loss(head.weight, hidden, targets, head.bias).float()


def lm_loss(implementation: str, head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of the trained tokens' final hidden states ``hidden`` [N, H]."""
    if implementation == "liger":
        return liger_lm_loss(head, hidden, targets)
    if implementation == "chunked":
        return chunked_lm_loss(head, hidden, targets)
    if implementation == "full":
        return _summed_ce(head, hidden, targets)
    raise ValueError(f"unresolved loss implementation {implementation!r}")
