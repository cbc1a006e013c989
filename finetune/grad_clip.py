"""One gradient-clipping rule for every engine path, equal at any expert-parallel size.

The global norm is ``sqrt(sum dense-LoRA grad^2 + sum over the EP group of expert-LoRA grad^2)``:
exactly the norm of the same gradients at EP=1. DeepSpeed 0.19.8 computes it differently per wrapper:

- ZeRO-0 fp32 (the torch optimizer itself): ``runtime.utils.clip_grad_norm_`` *averages* each rank's
  norm over the data-parallel group, so at EP>1 every rank's own expert shard is averaged, not summed;
- ZeRO-0 bf16 (``DDP_BFLOAT16``: ``FP16_UnfusedOptimizer``): sums only the gradients that are all-reduced
  (``allreduce=False`` expert LoRA is left out of the clip coefficient);
- ZeRO-1/2 (``DeepSpeedZeroOptimizer``): sums every rank's gradient partition over the whole world, which
  is already the rule above (each expert-LoRA element lives in exactly one rank's partition of one EP
  rank's shard); ``tests/test_expert_parallel.py`` checks that it matches EP=1.

So at ZeRO-0 DeepSpeed gets ``gradient_clipping: 0`` and :func:`clip_gradients` scales the reduced
``param.grad`` tensors in place after the last backward of a step, before ``engine.step()``; at ZeRO-1/2
DeepSpeed clips (its gradients live in partitioned flat fp32 buffers we do not touch).
The coefficient stays on the device: no host sync.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_ and DeepSpeed


def we_clip(engine) -> bool:
    """True where :func:`clip_gradients` owns clipping (ZeRO-0); False where DeepSpeed's ZeRO-1/2 does."""
    return engine.zero_optimization_stage() == 0


def global_grad_norm(model) -> torch.Tensor:
    """The EP-independent norm of the trainable gradients now in ``param.grad`` (fp32, on the device).

    Dense gradients are identical on every rank after DeepSpeed's all-reduce; each expert-LoRA shard's
    are identical across its expert-data-parallel group, so summing the shards over the EP group
    gives the norm of all experts.
    """
    from ossforge.finetune.expert_parallel import expert_parallel_group

    dense, expert = [], []
    for p in model.parameters():
        if p.requires_grad and p.grad is not None:
            (expert if hasattr(p, "ep_kind") else dense).append(p.grad.detach().float().pow(2).sum())
    device = next(model.parameters()).device
    zero = torch.zeros((), dtype=torch.float32, device=device)
    dense_sq = torch.stack(dense).sum() if dense else zero
    expert_sq = torch.stack(expert).sum() if expert else zero.clone()
    group = expert_parallel_group(model)
    if group is not None:
        dist.all_reduce(expert_sq, group=group)
    return (dense_sq + expert_sq).sqrt()


@torch.no_grad()
def clip_gradients(engine, max_norm: float) -> torch.Tensor:
    """Scale ``engine``'s trainable gradients so their global norm is at most ``max_norm``; returns the
    norm before clipping (a device tensor). ``max_norm <= 0`` computes the norm and clips nothing."""
    model = getattr(engine, "module", engine)
    norm = global_grad_norm(model)
    if max_norm > 0:
        coef = (max_norm / (norm + EPS)).clamp(max=1.0)
        for p in model.parameters():
            if p.requires_grad and p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
    return norm
