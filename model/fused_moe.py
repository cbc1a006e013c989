"""``fuse_moe(model)``: run a transformers gpt-oss model's MoE layers on ossforge's fused MoE-LoRA path.

Each ``GptOssMLP`` is switched, in place, to :class:`FusedGptOssMLP` (a subclass whose ``forward`` calls
:func:`ossforge.kernels.moe_lora.moe_lora`). No parameter is moved, renamed or copied: the router, the
expert weights and peft's ``ParamWrapper`` LoRA factors (``lora_A``/``lora_B`` for ``gate_up_proj`` and
``down_proj``) stay where they are, so ``state_dict`` and ``save_pretrained`` files are unchanged. The
fused forward reads the LoRA factors of the active adapter on every call, so ``disable_adapter()``,
``set_adapter`` and merging keep working. Cases the kernels do not cover (several active expert adapters,
expert parallelism inside transformers, non-default SwiGLU constants) fall back to the stock forward.
"""

from __future__ import annotations

import torch
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

from ossforge.kernels.moe_lora import moe_lora
from ossforge.kernels.reference import SWIGLU_ALPHA, SWIGLU_LIMIT
from ossforge.model.mxfp4_experts import MXFP4Tensor

_FALLBACK = object()


def _expert_lora(wrapper):
    """``(lora_A.weight, lora_B.weight, scaling)`` of a ParamWrapper's active adapter, None, or _FALLBACK."""
    if wrapper is None or wrapper.disable_adapters or wrapper.merged:
        return None
    active = [name for name in wrapper.active_adapters if name in wrapper.lora_A]
    if not active:
        return None
    if len(active) > 1:
        return _FALLBACK
    name = active[0]
    return wrapper.lora_A[name].weight, wrapper.lora_B[name].weight, wrapper.scaling[name]


def _unwrap_experts(experts):
    """Base ``GptOssExperts`` and ``{parameter_name: ParamWrapper}`` of peft's nested wrappers."""
    wrappers = {}
    module = experts
    while hasattr(module, "parameter_name") and hasattr(module, "base_layer"):
        wrappers[module.parameter_name] = module
        module = module.base_layer
    return module, wrappers


def _kernel_weight(weight):
    """MXFP4-resident experts go to the kernels packed (they decode W in their K loop); dense ones as they are."""
    return weight.packed() if isinstance(weight, MXFP4Tensor) else weight


def fused_experts_call(mlp):
    """``f(rows [N, H], weights [N, k], index [N, k]) -> [N, H]`` running ``mlp``'s experts (with the active
    expert LoRA) on the fused kernels, or None when the fused path does not cover this block's state.

    Public for code that routes tokens itself (expert parallelism) but wants the fused experts.
    """
    experts, wrappers = _unwrap_experts(mlp.experts)
    lora1 = _expert_lora(wrappers.get("gate_up_proj"))
    lora2 = _expert_lora(wrappers.get("down_proj"))
    unsupported = (
        lora1 is _FALLBACK
        or lora2 is _FALLBACK
        or getattr(experts, "_is_expert_parallel", False)
        or getattr(experts, "alpha", None) != SWIGLU_ALPHA
        or getattr(experts, "limit", None) != SWIGLU_LIMIT
        or bool(set(wrappers) - {"gate_up_proj", "down_proj"})
    )
    if unsupported:
        return None
    backend = getattr(mlp, "ossforge_backend", None)

    def call(rows, weights, index):
        return moe_lora(
            rows, weights, index,
            _kernel_weight(experts.gate_up_proj), experts.gate_up_proj_bias,
            _kernel_weight(experts.down_proj), experts.down_proj_bias,
            gate_up_lora=lora1, down_lora=lora2, backend=backend,
        )

    return call


class FusedGptOssMLP(GptOssMLP):
    """``GptOssMLP`` whose experts run on the fused MoE-LoRA kernels (same parameters, same outputs)."""

    ossforge_backend: str | None = None

    def forward(self, hidden_states):
        call = fused_experts_call(self)
        if call is None:
            return super().forward(hidden_states)
        batch, seq, hidden = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden)
        _, router_scores, router_indices = self.router(flat)
        out = call(flat, router_scores, router_indices)
        return out.to(hidden_states.dtype).reshape(batch, seq, hidden), router_scores


def fuse_moe(model: torch.nn.Module, backend: str | None = None) -> torch.nn.Module:
    """Switch every gpt-oss MoE block of ``model`` (plain or peft-wrapped) to the fused path, in place.

    Apply it after peft (either order works, LoRA is read at call time) and before expert parallelism.

    ``backend``: "triton" or "torch"; default ``$OSSFORGE_MOE_BACKEND``, else triton on CUDA and torch
    on CPU (chosen per call from the input's device). Idempotent; returns ``model``.
    """
    if backend is not None and backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    for module in model.modules():
        # Exact types only: a subclass of GptOssMLP made by someone else (e.g. expert parallelism applied
        # before fuse_moe) keeps its class; one already fused (or built on FusedGptOssMLP) just gets the backend.
        if type(module) is GptOssMLP:
            module.__class__ = FusedGptOssMLP
        if isinstance(module, FusedGptOssMLP):
            module.ossforge_backend = backend
    return model


def unfuse_moe(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`fuse_moe` (back to the stock transformers forward), in place."""
    for module in model.modules():
        if type(module) is FusedGptOssMLP:
            module.__class__ = GptOssMLP
            module.__dict__.pop("ossforge_backend", None)
    return model
