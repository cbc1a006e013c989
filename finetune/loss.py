"""LM head + cross-entropy without the [tokens, vocab] fp32 logits (``training.loss``).

gpt-oss has a 201,088-token vocabulary: the logits of one trained token take ~0.8 MB in fp32, plus as
much again for their gradient. Three ways to compute the same summed loss and gradients:

- ``liger``: Liger's fused linear cross-entropy (``liger-kernel``, Triton, CUDA only): logits exist one
  chunk at a time inside the kernel, the gradient of the hidden states and of the head are formed there.
- ``chunked``: torch, any device: the trained tokens in chunks of :func:`chunk_tokens`; each chunk's
  loss and its gradients (hidden states, trainable head parameters) are computed in the forward and
  the chunk's logits freed, so backward only scales saved gradients. Peak: one chunk of logits
  (~256 MiB fp32), no recomputation. Works with any head module (a LoRA-wrapped ``lm_head`` too).
- ``full``: the whole [tokens, vocab] logits at once (the stock path; reference).

``auto``: ``liger`` on CUDA when ``liger-kernel`` is installed and the head is a plain ``nn.Linear``,
``chunked`` otherwise.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

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


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # bf16 logits -> fp32; fp64 stays fp64


def _summed_ce(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)
    return F.cross_entropy(logits.to(_wide(logits.dtype)), targets, reduction="sum")


class _ChunkedLMLoss(torch.autograd.Function):
    """Summed cross-entropy whose gradients are formed chunk by chunk during the forward (the scheme of
    Liger's fused kernel, in torch): each chunk's logits live only while its loss and gradients are
    computed, so nothing of size [tokens, vocab] is kept, and nothing is recomputed in backward. The
    backward only scales the saved gradients (hidden states and the head's trainable parameters, e.g. a
    LoRA ``lm_head``) by the incoming gradient. Hand-written because torch has no chunked linear
    cross-entropy and Liger's runs only on CUDA."""

    @staticmethod
    def forward(ctx, hidden, targets, head, chunk, *params):
        total = hidden.new_zeros((), dtype=_wide(hidden.dtype))
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_params = [torch.zeros_like(p) for p in params]
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk].detach().requires_grad_(grad_hidden is not None)
            with torch.enable_grad():
                loss = _summed_ce(head, h, targets[start:start + chunk])
                wrt = ([h] if grad_hidden is not None else []) + list(params)
                grads = torch.autograd.grad(loss, wrt) if wrt else ()
            total += loss.detach()
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = grads[0]
                grads = grads[1:]
            for acc, g in zip(grad_params, grads):
                acc += g
        ctx.save_for_backward(*([] if grad_hidden is None else [grad_hidden]), *grad_params)
        ctx.has_hidden = grad_hidden is not None
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = list(ctx.saved_tensors)
        grad_hidden = saved.pop(0) * grad_total if ctx.has_hidden else None
        return (grad_hidden, None, None, None, *(g * grad_total for g in saved))


def chunked_lm_loss(head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` [N, V] against ``targets`` [N], one chunk of logits at a time."""
    chunk = chunk or chunk_tokens(head.weight.shape[0])
    if not torch.is_grad_enabled():
        return sum((_summed_ce(head, hidden[s:s + chunk], targets[s:s + chunk])
                    for s in range(0, hidden.shape[0], chunk)), hidden.new_zeros((), dtype=_wide(hidden.dtype)))
    params = [p for p in head.parameters() if p.requires_grad]
    return _ChunkedLMLoss.apply(hidden, targets, head, chunk, *params)


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
