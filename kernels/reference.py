"""Pure-torch grouped expert GEMMs: the reference semantics of the Triton kernels and the CPU fast path.

Three primitives cover the whole MoE-LoRA forward and backward (rows are sorted by expert, see
``routing.py``; expert e owns rows ``offsets[e]:offsets[e+1]``):

``expert_matmul``  out[i] = epilogue( xin[i] @ W[e] + bias[e] + s * (xin[i] @ L1[e]) @ L2[e] ) * row_scale[i]
                   with xin[i] = x[rows[i]] (gathered) or x[i]; W, L1, L2 are any strided [E, K, N] views, so
                   the same primitive runs ``x @ W`` forward and ``dY @ W^T`` backward; the optional epilogue
                   is gpt-oss's clamped SwiGLU over interleaved gate/up columns.
``expert_tn``      out[e] = sum over expert e's rows i of L[lrows[i]]^T R[rrows[i]]  ([E, P, Q]): the reduction
                   behind dA, dB and (when experts train) dW.
``down_backward``  ``expert_matmul`` of dY with W2^T whose epilogue is the SwiGLU backward (dh, act, the
                   routing-weight gradient): one pass instead of a GEMM followed by a chain of elementwise ops.

The torch versions loop over experts on contiguous slices (one host read of ``offsets``); the LoRA term is
applied as ``(x A) B`` and ``W + dW`` is never formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ossforge.kernels.routing import Routing

# The torch path gathers token rows once per backward and reuses them (the Triton path gathers in-kernel).
PREGATHER = True

SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0


@dataclass
class LoraFactors:
    """``s * (x @ l1[e]) @ l2[e]``: l1 is [E, K, r], l2 is [E, r, N] (views of peft's weights are fine)."""

    l1: torch.Tensor
    l2: torch.Tensor
    scaling: float


def swiglu(h: torch.Tensor, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT, out=None) -> torch.Tensor:
    """gpt-oss activation: gate = h[..., ::2] clamped above, up = h[..., 1::2] clamped both sides."""
    gate = h[..., ::2].clamp(max=limit)
    up_p1 = h[..., 1::2].clamp(min=-limit, max=limit).add_(1)
    glu = gate.mul_(torch.sigmoid(gate * alpha))
    return torch.mul(up_p1, glu, out=out)


def swiglu_backward(h: torch.Tensor, grad_a: torch.Tensor, alpha: float = SWIGLU_ALPHA,
                    limit: float = SWIGLU_LIMIT) -> torch.Tensor:
    """d swiglu / d h (interleaved), matching autograd of :func:`swiglu` (clamp passes grad at the bound)."""
    return swiglu_forward_backward(h, grad_a, alpha, limit)[1]


def swiglu_forward_backward(h, grad_a, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT,
                            act_out=None, dh_out=None):
    """``(swiglu(h), d/dh)`` sharing the sigmoid and clamps (the backward needs both); ``*_out``: write there."""
    g_raw, u_raw = h[..., ::2], h[..., 1::2]
    gate = g_raw.clamp(max=limit)
    up_p1 = u_raw.clamp(min=-limit, max=limit).add_(1)
    sig = torch.sigmoid(gate * alpha)
    glu = gate.mul_(sig)
    act = torch.mul(up_p1, glu, out=act_out)
    dh = torch.empty_like(h) if dh_out is None else dh_out
    # d glu / d gate = sig + alpha * glu * (1 - sig); zero where the clamp was active.
    d_gate = torch.addcmul(sig, glu, torch.rsub(sig, 1), value=alpha).mul_(up_p1)
    torch.mul(d_gate, grad_a, out=dh[..., ::2]).masked_fill_(g_raw > limit, 0)
    torch.mul(glu, grad_a, out=dh[..., 1::2]).masked_fill_((u_raw < -limit) | (u_raw > limit), 0)
    return act, dh


EPILOGUE_ROWS = 1024


def _chunks(bounds: list[int]):
    """Runs of consecutive experts with about ``EPILOGUE_ROWS`` rows: ``(first, last + 1, lo, hi)``.

    Sorted rows of consecutive experts are contiguous, so an epilogue can run once per run instead of once per
    expert: cache-sized, with far fewer (OpenMP) parallel regions than per-expert elementwise ops.
    """
    first, rows = 0, EPILOGUE_ROWS
    for e in range(len(bounds) - 1):
        if bounds[e + 1] - bounds[first] >= rows or e == len(bounds) - 2:
            yield first, e + 1, bounds[first], bounds[e + 1]
            first = e + 1


def expert_matmul(x, w, routing: Routing, *, gather: bool = False, bias=None,
                  lora: LoraFactors | None = None, row_scale=None, swiglu_out: bool = False,
                  scatter: bool = False):
    """Grouped ``xin @ W[e]`` (+ bias, + LoRA, * row_scale); returns ``(out, act, xl)``.

    ``gather``: xin[i] = x[token_of_row[i]] (else x is already in sorted row order). ``scatter``: write row i
    to slot ``perm[i]`` so that ``out.view(T, k, N).sum(1)`` is the deterministic top-k combine.
    ``out``: [S, N] (pre-activation when ``swiglu_out``); ``act``: its SwiGLU or None;
    ``xl``: ``xin @ L1[e]`` ([S, r], kept for the LoRA gradients) when ``lora`` else None.
    The epilogue runs per run of experts (``_chunks``) while the rows are still in cache.
    """
    bounds = routing.bounds()
    rows = routing.token_of_row
    num_rows = bounds[-1]
    n_out = w.shape[-1]
    out = x.new_empty(num_rows, n_out)
    act = x.new_empty(num_rows, n_out // 2) if swiglu_out else None
    xl = x.new_empty(num_rows, lora.l1.shape[-1]) if lora is not None else None
    if lora is not None:  # small; contiguous factors keep every per-expert mm copy-free
        lora = LoraFactors(lora.l1.contiguous(), lora.l2.contiguous(), lora.scaling)
    for first, last, c_lo, c_hi in _chunks(bounds):
        for e in range(first, last):
            lo, hi = bounds[e], bounds[e + 1]
            if hi == lo:
                continue
            xe = x.index_select(0, rows[lo:hi]) if gather else x[lo:hi]
            oe = out[lo:hi]
            if bias is not None:
                torch.addmm(bias[e], xe, w[e], out=oe)
            else:
                torch.mm(xe, w[e], out=oe)
            if lora is not None:
                xle = xl[lo:hi]
                torch.mm(xe, lora.l1[e], out=xle)
                oe.addmm_(xle, lora.l2[e], alpha=lora.scaling)
        if c_hi == c_lo:
            continue
        if row_scale is not None:
            out[c_lo:c_hi].mul_(row_scale[c_lo:c_hi, None])
        if swiglu_out:
            swiglu(out[c_lo:c_hi], out=act[c_lo:c_hi])
    if scatter:  # slot order through the inverse permutation: a gather, much faster than index_copy
        out = out.index_select(0, routing.inverse_perm())
    return out, act, xl


def down_backward(dout, w_t, routing: Routing, h, row_weight, lora: LoraFactors | None = None,
                  gathered: bool = True):
    """Backward of ``y = w * (swiglu(h) W2 + ...)`` up to dh, per run of experts (the dSwiGLU epilogue).

    ``dout`` rows: gathered per sorted row (``gathered``) or token rows. Returns ``(dh, act, g_dot_act, dyl)``:
    ``g = dout W2^T + s (dout B2) A2``; ``dh = dswiglu(h) * (w g)``; ``act = swiglu(h)``; ``g_dot_act`` [S]
    is the routing-weight gradient without the bias term; ``dyl = dout B2`` ([S, r]) for dA.
    """
    bounds = routing.bounds()
    num_rows = bounds[-1]
    dh = torch.empty_like(h)
    act = h.new_empty(num_rows, h.shape[-1] // 2)
    gdot = h.new_empty(num_rows)
    dyl = h.new_empty(num_rows, lora.l1.shape[-1]) if lora is not None else None
    if lora is not None:
        lora = LoraFactors(lora.l1.contiguous(), lora.l2.contiguous(), lora.scaling)
    g = h.new_empty(min(num_rows, 2 * EPILOGUE_ROWS + max(b - a for a, b in zip(bounds, bounds[1:]))),
                    w_t.shape[-1])
    for first, last, c_lo, c_hi in _chunks(bounds):
        if c_hi == c_lo:
            continue
        gc = g[:c_hi - c_lo]
        for e in range(first, last):
            lo, hi = bounds[e], bounds[e + 1]
            if hi == lo:
                continue
            de = dout[lo:hi] if gathered else dout.index_select(0, routing.token_of_row[lo:hi])
            ge = gc[lo - c_lo:hi - c_lo]
            torch.mm(de, w_t[e], out=ge)
            if lora is not None:
                torch.mm(de, lora.l1[e], out=dyl[lo:hi])
                ge.addmm_(dyl[lo:hi], lora.l2[e], alpha=lora.scaling)
        swiglu_forward_backward(h[c_lo:c_hi], gc * row_weight[c_lo:c_hi, None], act_out=act[c_lo:c_hi],
                                dh_out=dh[c_lo:c_hi])
        torch.linalg.vecdot(gc, act[c_lo:c_hi], out=gdot[c_lo:c_hi])
    return dh, act, gdot, dyl


def expert_tn(left, right, routing: Routing, *, gather_left: bool = False, gather_right: bool = False):
    """Per-expert ``L_e^T R_e`` summed over the expert's rows: [E, P, Q] (zeros for empty experts)."""
    bounds = routing.bounds()
    rows = routing.token_of_row
    out = left.new_zeros(routing.num_experts, left.shape[-1], right.shape[-1])
    for e in range(routing.num_experts):
        lo, hi = bounds[e], bounds[e + 1]
        if hi == lo:
            continue
        le = left.index_select(0, rows[lo:hi]) if gather_left else left[lo:hi]
        re = right.index_select(0, rows[lo:hi]) if gather_right else right[lo:hi]
        torch.mm(le.t(), re, out=out[e])
    return out


def moe_reference(x, router_index, router_weight, gate_up, gate_up_bias, down, down_bias,
                  gate_up_lora=None, down_lora=None):
    """Token-by-token reference of the whole MoE-LoRA layer (autograd-differentiable, tests only).

    ``*_lora`` are ``(A [E, r, K], B [E, N, r], scaling)`` per expert in plain layout.
    """
    num_tokens, top_k = router_index.shape
    rows = []
    for t in range(num_tokens):
        acc = torch.zeros_like(x[t])
        for j in range(top_k):
            e = int(router_index[t, j])
            h = x[t] @ gate_up[e] + gate_up_bias[e]
            if gate_up_lora is not None:
                a_, b_, s = gate_up_lora
                h = h + s * (b_[e] @ (a_[e] @ x[t]))
            a = swiglu(h)
            y = a @ down[e] + down_bias[e]
            if down_lora is not None:
                a_, b_, s = down_lora
                y = y + s * (b_[e] @ (a_[e] @ a))
            acc = acc + router_weight[t, j] * y
        rows.append(acc)
    return torch.stack(rows)
