"""Models that hold only a range of their experts: the building blocks of rank-sharded loading.

A model is first built on the meta device (shapes, no memory); then each tensor is materialised on
its own device: the dense weights whole, the experts only for ``expert_range = (start, stop)`` of the
global experts (an expert-parallel rank's share). The ``GptOssExperts`` module of every layer then
holds ``stop - start`` experts and records where they sit in the global numbering::

    experts.num_experts          # local count: what transformers' forward and peft see
    experts.num_global_experts   # the router's count
    experts.expert_range         # (start, stop) global indices held here

Expert parallelism (``finetune/expert_parallel.py``) finds the experts already sharded and only marks
them; peft creates the expert LoRA at the local size.
"""

from __future__ import annotations

import torch
from torch import nn

EXPERT_PARAMS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")


def ep_expert_range(num_experts: int, ep_rank: int, ep_size: int) -> tuple[int, int]:
    """Global experts ``[start, stop)`` an expert-parallel rank owns (contiguous blocks, as DeepSpeed)."""
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"expert parallel size {ep_size} does not divide {num_experts} experts")
    local = num_experts // ep_size
    return ep_rank * local, (ep_rank + 1) * local


def meta_model(config):
    """``GptOssForCausalLM(config)`` on the meta device: every parameter a shape without storage."""
    from transformers import GptOssForCausalLM

    with torch.device("meta"):
        return GptOssForCausalLM(config)


def expert_modules(model) -> list[tuple[int, nn.Module]]:
    """``(layer index, GptOssExperts)`` of every MoE layer (under any peft wrapping)."""
    from ossforge.model.fused_moe import _unwrap_experts

    out = []
    for name, module in model.named_modules():
        if type(module).__name__ == "GptOssExperts":
            out.append((int(name.split("layers.")[1].split(".")[0]), module))
    return [(layer, _unwrap_experts(m)[0]) for layer, m in out]


def set_expert_range(experts: nn.Module, expert_range: tuple[int, int], num_global: int) -> None:
    """Record that ``experts`` holds global experts ``expert_range`` of ``num_global``."""
    experts.num_global_experts = num_global
    experts.expert_range = tuple(expert_range)
    experts.num_experts = expert_range[1] - expert_range[0]


def expert_range_of(experts: nn.Module) -> tuple[int, int]:
    return getattr(experts, "expert_range", (0, experts.num_experts))


def assign(module: nn.Module, attr: str, tensor: torch.Tensor) -> None:
    """Replace parameter (or buffer) ``attr`` of ``module`` by ``tensor``, keeping ``requires_grad``."""
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = tensor


def keep_local_experts(model, expert_range: tuple[int, int]) -> None:
    """Drop every expert outside ``expert_range`` from a model that holds them all (in place)."""
    start, stop = expert_range
    for _, experts in expert_modules(model):
        total = experts.num_experts
        if (start, stop) == (0, total):
            continue
        for attr in EXPERT_PARAMS:
            assign(experts, attr, getattr(experts, attr).detach()[start:stop].clone())
        set_expert_range(experts, expert_range, total)


def rebuild_rotary(model, device) -> None:
    """Non-persistent buffers (rotary ``inv_freq``) are in no file: compute them on ``device``."""
    rotary = type(model.model.rotary_emb)(config=model.config)
    model.model.rotary_emb = rotary.to(device)


def check_materialised(model, device) -> None:
    """Every tensor is on ``device`` (a dry run on the meta device checks nothing)."""
    if torch.device(device).type == "meta":
        return
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left unloaded: {left[:3]}")
