"""The gpt-oss MoE experts with expert LoRA as one autograd Function.

Forward: sort slots by expert, ``h = x W1 + b1 + s1 (x A1) B1`` (gathered rows), ``a = swiglu(h)``,
``y = w * (a W2 + b2 + s2 (a A2) B2)`` written back in slot order, top-k summed in a fixed order.
Backward computes what is asked for (``ctx.needs_input_grad``): dX, the router-weight grad and
dA/dB always cost two grouped GEMMs plus rank-r work; base ``dW``/``db`` are computed only when the
expert weights themselves require grad (full fine-tune), never for frozen experts.

LoRA factors are peft's own ``lora_A.weight [r*E, K]`` / ``lora_B.weight [N, r*E]`` tensors (see
``peft.tuners.lora.layer.ParamWrapper.get_delta_factors``), passed straight in so autograd fills their
``.grad``; only strided views of them are taken.
"""

from __future__ import annotations

import os

import torch

from ossforge.kernels.mxfp4 import MXFP4Weight
from ossforge.kernels.reference import LoraFactors
from ossforge.kernels.routing import sort_by_expert

BACKENDS = ("triton", "torch")


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """``backend`` or $OSSFORGE_MOE_BACKEND; default triton on CUDA, torch elsewhere."""
    name = backend or os.environ.get("OSSFORGE_MOE_BACKEND") or ("triton" if device.type == "cuda" else "torch")
    if name not in BACKENDS:
        raise ValueError(f"OSSFORGE_MOE_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def _ops(backend: str):
    if backend == "triton":
        from ossforge.kernels import grouped_gemm as ops
    else:
        from ossforge.kernels import reference as ops
    return ops


def lora_views(a_weight, b_weight, num_experts: int):
    """peft layout -> ``(A [E, r, K], B [E, N, r])`` views (no copies)."""
    k = a_weight.shape[-1]
    n = b_weight.shape[0]
    a = a_weight.view(num_experts, -1, k)
    b = b_weight.view(n, -1, num_experts).permute(2, 0, 1)
    return a, b


class MoeLoraFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, router_weight, router_index, w1, b1, w2, b2, a1, bb1, a2, bb2, s1, s2, backend):
        ops = _ops(backend)
        num_tokens, top_k = router_index.shape
        num_experts = w1.shape[0]
        routing = sort_by_expert(router_index, num_experts)
        w_rows = router_weight.reshape(-1)[routing.perm].contiguous()
        lora1 = lora2 = None
        if a1 is not None:
            a, b = lora_views(a1, bb1, num_experts)
            lora1 = LoraFactors(a.transpose(1, 2), b.transpose(1, 2), s1)
        if a2 is not None:
            a, b = lora_views(a2, bb2, num_experts)
            lora2 = LoraFactors(a.transpose(1, 2), b.transpose(1, 2), s2)
        h, act, xl1 = ops.expert_matmul(x, w1, routing, gather=True, bias=b1, lora=lora1, swiglu_out=True)
        y_slots, _, xl2 = ops.expert_matmul(act, w2, routing, bias=b2, lora=lora2, row_scale=w_rows, scatter=True)
        out = y_slots.view(num_tokens, top_k, y_slots.shape[-1]).sum(1)  # explicit width: T may be 0
        # Packed MXFP4 experts are not tensors (frozen, no grad): kept on ctx, the rest saved as usual.
        ctx.packed = [w if isinstance(w, MXFP4Weight) else None for w in (w1, w2)]
        ctx.save_for_backward(x, w_rows, h, xl1, xl2, None if ctx.packed[0] else w1, b1,
                              None if ctx.packed[1] else w2, b2, a1, bb1, a2, bb2)
        ctx.routing, ctx.s1, ctx.s2, ctx.backend = routing, s1, s2, backend
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w_rows, h, xl1, xl2, w1, b1, w2, b2, a1, bb1, a2, bb2 = ctx.saved_tensors
        w1 = ctx.packed[0] if ctx.packed[0] is not None else w1
        w2 = ctx.packed[1] if ctx.packed[1] is not None else w2
        ops = _ops(ctx.backend)
        routing, s1, s2 = ctx.routing, ctx.s1, ctx.s2
        need = ctx.needs_input_grad
        num_experts = w1.shape[0]
        num_tokens, top_k = routing.num_tokens, routing.top_k
        dout = dout.contiguous()
        grads = [None] * 14

        # Down projection: G = dY W2^T + s2 (dY B2) A2 on gathered rows of dout.
        lora2 = lora1 = None
        if a2 is not None:
            a2v, b2v = lora_views(a2, bb2, num_experts)
            lora2 = LoraFactors(b2v, a2v, s2)
        if ops.PREGATHER:
            dout_src, in_kernel = dout.index_select(0, routing.token_of_row), False
        else:
            dout_src, in_kernel = dout, True  # the kernels gather token rows themselves
        dh, act, dw, dyb2 = ops.down_backward(dout_src, w2.transpose(1, 2), routing, h, w_rows, lora2,
                                              gathered=not in_kernel)
        wcol = w_rows[:, None]
        if need[1]:
            if b2 is not None:
                dw = dw + (dout @ b2.t()).to(dw.dtype)[routing.token_of_row, routing.expert_of_row]
            d_router = torch.empty_like(dw)
            d_router[routing.perm] = dw
            grads[1] = d_router.view(num_tokens, top_k).to(w_rows.dtype)
        if a2 is not None and (need[9] or need[10]):
            grads[9] = (s2 * ops.expert_tn(dyb2 * wcol, act, routing)).reshape_as(a2)
            dbt = s2 * ops.expert_tn(xl2 * wcol, dout_src, routing, gather_right=in_kernel)  # [E, r, H]
            grads[10] = dbt.permute(2, 1, 0).reshape_as(bb2)
        if need[5]:
            grads[5] = ops.expert_tn(act * wcol, dout_src, routing, gather_right=in_kernel)
        if b2 is not None and need[6]:
            grads[6] = ops.expert_tn(wcol, dout_src, routing, gather_right=in_kernel)[:, 0]
        del act, dout_src
        # Gate/up projection: dX = dH W1^T + s1 (dH B1) A1, summed over the k slots of each token.
        if a1 is not None:
            a1v, b1v = lora_views(a1, bb1, num_experts)
            lora1 = LoraFactors(b1v, a1v, s1)
        if need[0] or (a1 is not None and need[7]):
            dx_slots, _, dhb1 = ops.expert_matmul(dh, w1.transpose(1, 2), routing, lora=lora1, scatter=True)
            grads[0] = dx_slots.view(num_tokens, top_k, dx_slots.shape[-1]).sum(1) if need[0] else None
            if a1 is not None and need[7]:
                grads[7] = (s1 * ops.expert_tn(dhb1, x, routing, gather_right=True)).reshape_as(a1)
        if a1 is not None and need[8]:
            dbt = s1 * ops.expert_tn(xl1, dh, routing)  # [E, r, 2I]
            grads[8] = dbt.permute(2, 1, 0).reshape_as(bb1)
        if need[3]:
            grads[3] = ops.expert_tn(x, dh, routing, gather_left=True)
        if b1 is not None and need[4]:
            ones = torch.ones(dh.shape[0], 1, dtype=dh.dtype, device=dh.device)
            grads[4] = ops.expert_tn(ones, dh, routing)[:, 0]
        return tuple(grads)


def moe_lora(x, router_weight, router_index, gate_up, gate_up_bias, down, down_bias,
             gate_up_lora=None, down_lora=None, backend: str | None = None):
    """Output [T, H] of the gpt-oss experts for ``x [T, H]`` routed by ``router_index/weight [T, k]``.

    T may be 0 (an expert-parallel rank that received no tokens): the output is [0, H] and the gradients are
    well defined (dX [0, H], zero LoRA and expert gradients).

    ``gate_up_lora`` / ``down_lora``: ``(lora_A.weight, lora_B.weight, scaling)`` in peft's layout, or None.
    ``gate_up`` / ``down``: dense ``[E, K, N]`` tensors or frozen :class:`MXFP4Weight` (decoded in the GEMMs).
    """
    backend = resolve_backend(x.device, backend)
    a1, bb1, s1 = gate_up_lora if gate_up_lora is not None else (None, None, 0.0)
    a2, bb2, s2 = down_lora if down_lora is not None else (None, None, 0.0)
    dtype = gate_up.dtype
    if a1 is not None:
        a1, bb1 = a1.to(dtype), bb1.to(dtype)
    if a2 is not None:
        a2, bb2 = a2.to(dtype), bb2.to(dtype)
    return MoeLoraFunction.apply(
        x.to(dtype), router_weight.to(dtype), router_index, gate_up, gate_up_bias, down, down_bias,
        a1, bb1, a2, bb2, float(s1), float(s2), backend,
    )
