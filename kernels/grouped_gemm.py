"""Triton grouped GEMMs over experts; same signatures and semantics as ``reference.py``.

``expert_matmul``: one program per (row tile, column tile), in grouped order (``GROUP_M`` row tiles sweep the
column tiles together so their X rows and W columns stay in L2). Row tiles come from ``routing.tile_table`` and
never straddle experts. The prologue gathers token rows through ``token_of_row`` (no permuted copy of X);
the K loop advances precomputed tile pointers and also accumulates the LoRA down-projection ``x @ L1[e]``
(rank padded to 16); the epilogue adds ``s * (x L1) L2[e]``, the bias, the routing weight, and for gate/up
the clamped SwiGLU. Every W, L1/L2, bias, h and dh tile is contiguous along its fast axis (16-byte cp.async
loads, pipelined, feeding wgmma on Hopper): for SwiGLU a program owns ``BLOCK_N`` contiguous interleaved h
columns (one accumulator, one dot) and de-interleaves (gate, up) in registers with ``reshape`` + ``split``;
rows can be scattered back to slot order for a deterministic top-k sum. In backward the same kernel computes
``g = dY W2^T (+ LoRA)`` with the SwiGLU backward as its epilogue (h read and dh written as contiguous
``[BLOCK_M, 2 BLOCK_N]`` tiles split/joined in registers; ``act`` and per-tile partial sums of ``g * act`` for
the routing-weight gradient), so ``g`` never goes to memory.

MXFP4 experts (``W`` an :class:`ossforge.kernels.mxfp4.MXFP4Weight`): the same kernel loads the packed bytes and
E8M0 scales of each W tile in the K loop and decodes them (16-entry LUT, ``2^(scale-127)``) to the dtype of X
before the dot, for W (forward) and W^T (the dX GEMMs and the down backward) alike; everything else is unchanged.

``expert_tn``: one program per (expert, P tile, Q tile) loops over that expert's rows: ``L_e^T R_e``
(dA, dB and, for trainable experts, dW).

Row/expert offsets are int64 inside the kernels (S * K passes 2^31 at gpt-oss sizes). Under
``TRITON_INTERPRET=1`` tiles are cast to fp32 (a bf16 ``tl.dot`` is wrong in the interpreter) and there is a
single autotune config (several crash without a GPU).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ossforge.kernels.mxfp4 import MXFP4Weight, fp4_lut
from ossforge.kernels.reference import SWIGLU_ALPHA, SWIGLU_LIMIT, LoraFactors
from ossforge.kernels.routing import Routing, tile_table

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
PREGATHER = False  # rows are gathered inside the kernels


def _mm_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)]
    # Hopper: 128-row tiles (BLOCK_M comes from the tile table), 128-256 wide, BLOCK_K 64, 3-4 stages.
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [(256, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 4), (128, 128, 8, 3), (64, 64, 8, 4),
                                (64, 64, 4, 4)]
    ]


MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _mm_configs())
GROUP_M = tl.constexpr(8)  # row tiles that share each sweep over the column tiles (L2 reuse of X rows and W columns)


def _tn_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_P": 16, "BLOCK_Q": 16, "BLOCK_R": 16}, num_warps=1)]
    return [
        triton.Config({"BLOCK_P": bp, "BLOCK_Q": bq, "BLOCK_R": br}, num_warps=w, num_stages=s)
        for bp, bq, br, w, s in [(64, 128, 64, 4, 3), (128, 128, 32, 8, 3), (32, 128, 64, 4, 4), (16, 128, 64, 4, 4),
                                 (16, 256, 64, 4, 4)]
    ]


@triton.jit
def _dot(a, b, acc, CAST_F32: tl.constexpr):
    if CAST_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _mxfp4_tile(q_ptr, s_ptr, lut_ptr, e64, ks, cols, mask, sqe, sqo, sse, sso, W_TRANS: tl.constexpr):
    """fp32 tile ``W[k, n]`` (rows ``ks``, columns ``cols``) decoded from MXFP4 bytes in the published layout.

    The stored matrix is ``[E, out, in]`` with two FP4 codes per byte (even input in the low nibble) and one
    E8M0 exponent per 32 inputs: ``W = W_stored^T`` (forward, K = in) or ``W_stored`` itself (``W_TRANS``: the
    dX GEMMs over ``W^T``, K = out). Value = LUT[code] * 2^(scale - 127), the power of two built from its bits.
    """
    if W_TRANS:
        out_i = ks[:, None]
        in_i = cols[None, :]
    else:
        out_i = cols[None, :]
        in_i = ks[:, None]
    byte = tl.load(q_ptr + e64 * sqe + out_i * sqo + in_i // 2, mask=mask, other=0).to(tl.int32)
    code = (byte >> ((in_i % 2) * 4)) & 15
    value = tl.load(lut_ptr + code)
    exp = tl.load(s_ptr + e64 * sse + out_i * sso + in_i // 32, mask=mask, other=127).to(tl.int32)
    # 2^(exp-127): exponent bits of an fp32 for exp >= 1; byte 0 is the subnormal 2^-127.
    scale = tl.where(exp == 0, 5.877471754111438e-39, (exp << 23).to(tl.float32, bitcast=True))
    return value * scale


# reset_to_zero: configs with a smaller BLOCK_N write more partial-sum rows; stale ones must not survive tuning.
@triton.autotune(configs=_mm_configs(), key=["N", "K", "SWIGLU", "DSWIGLU", "HAS_LORA", "BLOCK_M", "MXFP4", "W_TRANS"],
                 reset_to_zero=["part_ptr"])
@triton.jit
def _expert_matmul_kernel(
    x_ptr, w_ptr, wscale_ptr, lut_ptr, bias_ptr, l1_ptr, l2_ptr, scale_ptr, rows_ptr, perm_ptr,
    tile_expert_ptr, tile_start_ptr, offsets_ptr,
    out_ptr, act_ptr, xl_ptr, h_ptr, part_ptr,
    N, K, R, num_m_tiles, lora_scaling,
    sxm, sxk, swe, swk, swn, sqe, sqo, sse, sso, sbe, sbn,
    s1e, s1k, s1r, s2e, s2r, s2n,
    som, son, sam, san, sxlm, sxlr, shm, shn, spn,
    alpha, limit,
    GATHER: tl.constexpr, SCATTER: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
    ROW_SCALE: tl.constexpr, SWIGLU: tl.constexpr, DSWIGLU: tl.constexpr, CAST_F32: tl.constexpr,
    MXFP4: tl.constexpr, W_TRANS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_RANK: tl.constexpr,
):
    # Grouped order: GROUP row tiles (mostly one expert) sweep the column tiles together, so the X rows and
    # the W columns they read stay in L2.
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n_tiles
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    expert = tl.load(tile_expert_ptr + pid_m)
    if expert < 0:
        return
    e64 = expert.to(tl.int64)
    row_start = tl.load(tile_start_ptr + pid_m)
    row_end = tl.load(offsets_ptr + e64 + 1)
    rows = row_start + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_m = rows < row_end
    # Rows past the tile's expert read a valid row (discarded at the store), so A loads need no row mask.
    if GATHER:
        src = tl.load(rows_ptr + rows, mask=mask_m, other=0).to(tl.int64)
    else:
        src = tl.minimum(rows, row_end - 1)
    # Accumulator columns of this program: contiguous columns of W. For SwiGLU they are interleaved
    # (gate, up) pairs, split in the epilogue; for the dSwiGLU epilogue they are columns of act.
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    ks = tl.arange(0, BLOCK_K)
    rk = tl.arange(0, BLOCK_RANK)
    mask_r = rk < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xl = tl.zeros((BLOCK_M, BLOCK_RANK), dtype=tl.float32)
    # Base pointers once; the K loop only advances them.
    a_ptrs = x_ptr + src[:, None] * sxm + ks[None, :] * sxk
    w_ptrs = w_ptr + e64 * swe + ks[:, None] * swk + cols[None, :] * swn
    l1_ptrs = l1_ptr + e64 * s1e + ks[:, None] * s1k + rk[None, :] * s1r
    for k0 in range(0, K, BLOCK_K):
        mask_k = ks < K - k0
        a = tl.load(a_ptrs, mask=mask_k[None, :], other=0.0)
        if MXFP4:
            wt = _mxfp4_tile(w_ptr, wscale_ptr, lut_ptr, e64, k0 + ks, cols, mask_k[:, None] & mask_n[None, :],
                             sqe, sqo, sse, sso, W_TRANS).to(a.dtype)
        else:
            wt = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(a, wt, acc, CAST_F32)
        if HAS_LORA:
            l1 = tl.load(l1_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            xl = _dot(a, l1, xl, CAST_F32)
            l1_ptrs += BLOCK_K * s1k
        a_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk
    if HAS_LORA:
        l2 = tl.load(l2_ptr + e64 * s2e + rk[:, None] * s2r + cols[None, :] * s2n,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc += lora_scaling * _dot(xl.to(l2.dtype), l2, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), CAST_F32)
        if pid_n == 0:
            tl.store(xl_ptr + rows[:, None] * sxlm + rk[None, :] * sxlr, xl.to(xl_ptr.dtype.element_ty),
                     mask=mask_m[:, None] & mask_r[None, :])
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e64 * sbe + cols * sbn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if DSWIGLU:
        # Backward epilogue of the down GEMM: acc = g = dY W2^T (+ LoRA) for columns j of act. With h's
        # gate/up pair (2j, 2j + 1) and the routing weight w: dh = dswiglu(h) * (w g), act = swiglu(h),
        # and this tile's share of sum_j g * act (the routing-weight gradient) into part[pid_n, row].
        # h and dh are read and written as one contiguous [BLOCK_M, 2 BLOCK_N] tile, (de)interleaved in registers.
        mask_o = mask_m[:, None] & mask_n[None, :]
        hcols = 2 * pid_n * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
        mask_h = mask_m[:, None] & (hcols < 2 * N)[None, :]
        h = tl.load(h_ptr + rows[:, None] * shm + hcols[None, :] * shn, mask=mask_h, other=0.0)
        hg, hu = tl.split(tl.reshape(h, (BLOCK_M, BLOCK_N, 2)))
        hg = hg.to(tl.float32)
        hu = hu.to(tl.float32)
        wrow = tl.load(scale_ptr + rows, mask=mask_m, other=0.0).to(tl.float32)
        gate = tl.minimum(hg, limit)
        up_p1 = tl.minimum(tl.maximum(hu, -limit), limit) + 1.0
        sig = tl.sigmoid(gate * alpha)
        glu = gate * sig
        act = up_p1 * glu
        ga = acc * wrow[:, None]
        d_gate = tl.where(hg <= limit, ga * up_p1 * (sig + alpha * glu * (1.0 - sig)), 0.0)
        d_up = tl.where((hu >= -limit) & (hu <= limit), ga * glu, 0.0)
        dh = tl.reshape(tl.join(d_gate, d_up), (BLOCK_M, 2 * BLOCK_N))
        tl.store(out_ptr + rows[:, None] * som + hcols[None, :] * son, dh.to(out_ptr.dtype.element_ty), mask=mask_h)
        tl.store(act_ptr + rows[:, None] * sam + cols[None, :] * san, act.to(act_ptr.dtype.element_ty), mask=mask_o)
        act_r = act.to(act_ptr.dtype.element_ty).to(tl.float32)  # the stored act, as the reference sees it
        part = tl.sum(tl.where(mask_o, acc * act_r, 0.0), axis=1)
        tl.store(part_ptr + pid_n * spn + rows, part, mask=mask_m)
        return
    if ROW_SCALE:
        scale = tl.load(scale_ptr + rows, mask=mask_m, other=0.0).to(tl.float32)
        acc = acc * scale[:, None]
    if SCATTER:
        dst = tl.load(perm_ptr + rows, mask=mask_m, other=0).to(tl.int64)
    else:
        dst = rows
    mask_o = mask_m[:, None] & mask_n[None, :]
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + dst[:, None] * som + cols[None, :] * son, out, mask=mask_o)
    if SWIGLU:
        # Columns (2j, 2j + 1) of h are (gate, up) of act column j. Round h to the storage dtype first so
        # act == swiglu(stored h) exactly as in the reference.
        hg, hu = tl.split(tl.reshape(out.to(tl.float32), (BLOCK_M, BLOCK_N // 2, 2)))
        gate = tl.minimum(hg, limit)
        up = tl.minimum(tl.maximum(hu, -limit), limit)
        act = (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
        acols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        mask_a = mask_m[:, None] & (acols < N // 2)[None, :]
        tl.store(act_ptr + dst[:, None] * sam + acols[None, :] * san, act.to(act_ptr.dtype.element_ty), mask=mask_a)


@triton.autotune(configs=_tn_configs(), key=["P", "Q"])
@triton.jit
def _expert_tn_kernel(
    l_ptr, r_ptr, rows_ptr, offsets_ptr, out_ptr,
    P, Q, slm, slp, srm, srq, soe, sop, soq,
    GATHER_L: tl.constexpr, GATHER_R: tl.constexpr, CAST_F32: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
):
    e64 = tl.program_id(0).to(tl.int64)
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    lo = tl.load(offsets_ptr + e64)
    hi = tl.load(offsets_ptr + e64 + 1)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_R):
        ms = (m0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        mask_m = ms < hi
        lrow = ms
        rrow = ms
        if GATHER_L:
            lrow = tl.load(rows_ptr + ms, mask=mask_m, other=0).to(tl.int64)
        if GATHER_R:
            rrow = tl.load(rows_ptr + ms, mask=mask_m, other=0).to(tl.int64)
        lt = tl.load(l_ptr + lrow[None, :] * slm + ps[:, None] * slp,
                     mask=mask_m[None, :] & (ps[:, None] < P), other=0.0)
        rt = tl.load(r_ptr + rrow[:, None] * srm + qs[None, :] * srq,
                     mask=mask_m[:, None] & (qs[None, :] < Q), other=0.0)
        acc = _dot(lt, rt, acc, CAST_F32)
    tl.store(out_ptr + e64 * soe + ps[:, None] * sop + qs[None, :] * soq, acc.to(out_ptr.dtype.element_ty),
             mask=(ps[:, None] < P) & (qs[None, :] < Q))


def _block_m(routing: Routing) -> int:
    if INTERPRET:
        return 16
    rows_per_expert = routing.num_tokens * routing.top_k / max(routing.num_experts, 1)
    return 128 if rows_per_expert >= 256 else 64


def _tiles(routing: Routing, block_m: int):
    cache = routing.__dict__.setdefault("_tile_cache", {})
    if block_m not in cache:
        cache[block_m] = tile_table(routing, block_m)
    return cache[block_m]


def expert_matmul(x, w, routing: Routing, *, gather: bool = False, bias=None,
                  lora: LoraFactors | None = None, row_scale=None, swiglu_out: bool = False,
                  scatter: bool = False, dswiglu_of=None):
    """Triton version of :func:`ossforge.kernels.reference.expert_matmul`.

    ``dswiglu_of=h`` (with ``row_scale`` = routing weights) switches to the down-backward epilogue and returns
    ``(dh, act, xl, g_dot_act)``: see :func:`down_backward`.
    """
    num_rows = routing.num_tokens * routing.top_k
    n, k = w.shape[-1], w.shape[-2]
    dswiglu = dswiglu_of is not None
    out = x.new_empty(num_rows, 2 * n) if dswiglu else x.new_empty(num_rows, n)
    act = x.new_empty(num_rows, n // 2) if swiglu_out else (x.new_empty(num_rows, n) if dswiglu else None)
    rank = lora.l1.shape[-1] if lora is not None else 0
    xl = x.new_empty(num_rows, rank) if lora is not None else None
    if num_rows == 0:
        return (out, act, xl, x.new_zeros(0)) if dswiglu else (out, act, xl)
    block_m = _block_m(routing)
    tile_expert, tile_start, max_tiles = _tiles(routing, block_m)
    dummy = out
    if lora is not None:
        # The K loop reads L1 [E, K, r] down K and the epilogue reads L2 [E, r, N] along N: give both that
        # layout (peft's views are strided the other way in some calls; the copies are a few MB).
        l1 = lora.l1 if lora.l1.stride(1) == 1 else lora.l1.transpose(1, 2).contiguous().transpose(1, 2)
        l2 = lora.l2 if lora.l2.stride(2) == 1 else lora.l2.contiguous()
    else:
        l1 = l2 = dummy.view(1, 1, -1)
    xl_t = xl if xl is not None else dummy
    act_t = act if act is not None else dummy
    bias_t = bias if bias is not None else dummy
    h_t = dswiglu_of if dswiglu else dummy
    # Per-column-tile partial sums of g * act; the smallest BLOCK_N bounds the number of tiles.
    part = torch.zeros(triton.cdiv(n, MIN_BLOCK_N), num_rows, device=x.device, dtype=torch.float32) if dswiglu \
        else torch.zeros(1, 1, device=x.device, dtype=torch.float32)

    packed = isinstance(w, MXFP4Weight)
    if packed:  # W decoded from MXFP4 in the K loop; the dense strides are unused
        w_t, wscale, lut = w.blocks, w.scales, fp4_lut(x.device)
        w_strides = (0, 0, 0, w.blocks.stride(0), w.blocks.stride(1), w.scales.stride(0), w.scales.stride(1))
    else:
        w_t, wscale, lut = w, dummy, dummy
        w_strides = (w.stride(0), w.stride(1), w.stride(2), 0, 0, 0, 0)

    def grid(meta):
        return (max_tiles * triton.cdiv(n, meta["BLOCK_N"]),)

    _expert_matmul_kernel[grid](
        x, w_t, wscale, lut, bias_t, l1, l2, row_scale if row_scale is not None else dummy,
        routing.token_of_row, routing.perm, tile_expert, tile_start, routing.offsets,
        out, act_t, xl_t, h_t, part,
        n, k, rank, max_tiles, float(lora.scaling) if lora is not None else 0.0,
        x.stride(0), x.stride(1), *w_strides,
        bias_t.stride(0), bias_t.stride(-1),
        l1.stride(0), l1.stride(1), l1.stride(2), l2.stride(0), l2.stride(1), l2.stride(2),
        out.stride(0), out.stride(1), act_t.stride(0), act_t.stride(-1), xl_t.stride(0), xl_t.stride(-1),
        h_t.stride(0), h_t.stride(-1), part.stride(0),
        SWIGLU_ALPHA, SWIGLU_LIMIT,
        GATHER=gather, SCATTER=scatter, HAS_BIAS=bias is not None, HAS_LORA=lora is not None,
        ROW_SCALE=row_scale is not None, SWIGLU=swiglu_out, DSWIGLU=dswiglu, CAST_F32=INTERPRET or x.dtype == torch.float32,
        MXFP4=packed, W_TRANS=packed and w.transposed,
        BLOCK_M=block_m, BLOCK_RANK=max(16, triton.next_power_of_2(max(rank, 1))),
    )
    if dswiglu:
        return out, act, xl, part.sum(0).to(x.dtype)
    return out, act, xl


def expert_tn(left, right, routing: Routing, *, gather_left: bool = False, gather_right: bool = False):
    """Triton version of :func:`ossforge.kernels.reference.expert_tn` (fp32 accumulate, [E, P, Q])."""
    p, q = left.shape[-1], right.shape[-1]
    if routing.num_tokens * routing.top_k == 0:  # no rows (e.g. an EP rank that got no tokens): no launch
        return left.new_zeros(routing.num_experts, p, q)
    out = left.new_empty(routing.num_experts, p, q)

    def grid(meta):
        return (routing.num_experts, triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(q, meta["BLOCK_Q"]))

    _expert_tn_kernel[grid](
        left, right, routing.token_of_row, routing.offsets, out,
        p, q, left.stride(0), left.stride(1), right.stride(0), right.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        GATHER_L=gather_left, GATHER_R=gather_right, CAST_F32=INTERPRET or left.dtype == torch.float32,
    )
    return out


def down_backward(dout, w_t, routing: Routing, h, row_weight, lora: LoraFactors | None = None,
                  gathered: bool = False):
    """Triton version of :func:`ossforge.kernels.reference.down_backward`: dSwiGLU fused in the GEMM epilogue."""
    dh, act, dyl, gdot = expert_matmul(dout, w_t, routing, gather=not gathered, lora=lora, row_scale=row_weight,
                                       dswiglu_of=h)
    return dh, act, gdot, dyl
