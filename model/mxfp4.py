"""MXFP4, the format the published gpt-oss checkpoints store their expert weights in.

Layout (as in ``openai/gpt-oss-*`` on the Hub and transformers' ``integrations/mxfp4.py``):

- ``<name>_blocks``: uint8 ``[E, rows, G, 16]``; each byte packs two FP4 (e2m1) codes, the low
  nibble being the even element and the high nibble the odd one, so a block holds 32 values.
- ``<name>_scales``: uint8 ``[E, rows, G]``; one E8M0 exponent per block of 32, bias 127.
- Groups run along the *input* dimension of each projection, so the stored matrix is the
  transpose of transformers' in-memory layout: ``gate_up_proj_blocks`` holds ``[E, 2I, H]`` for
  the model's ``gate_up_proj [E, H, 2I]``; ``down_proj_blocks`` holds ``[E, H, I]`` for
  ``down_proj [E, I, H]``.

:func:`dequantize_mxfp4` and :func:`quantize_mxfp4` work in the in-memory layout; the transposes
live here so callers never see them.
"""

from __future__ import annotations

import torch

GROUP = 32  # values per shared scale
SCALE_BIAS = 127

# e2m1 code -> value; codes 8..15 are the negatives of 0..7.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_MAX = 6.0


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``[E, rows, G, 16]`` blocks + ``[E, rows, G]`` scales -> weight ``[E, G*32, rows]`` in ``dtype``.

    The result is in transformers' in-memory layout (input dim second), e.g. the published
    ``gate_up_proj_blocks [E, 2I, H/32, 16]`` becomes ``gate_up_proj [E, H, 2I]``. Values are built
    in fp32 (every FP4 value times a power of two is exact there) and cast once.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() != 4 or blocks.shape[-1] != GROUP // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match "
            f"[E, rows, G, {GROUP // 2}] and [E, rows, G]"
        )
    experts, rows, groups, _ = blocks.shape
    # byte -> (value of its low nibble, value of its high nibble): one gather per byte
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    pairs = torch.stack((lut.repeat(16), lut.repeat_interleave(16)), dim=-1)  # [256, 2]
    out = torch.empty(experts, groups * GROUP, rows, dtype=dtype, device=blocks.device)
    for e in range(experts):  # one expert at a time bounds the fp32 temporaries
        values = pairs[blocks[e].long()].reshape(rows, groups, GROUP)
        values = torch.ldexp(values, scales[e].to(torch.int32).sub(SCALE_BIAS).unsqueeze(-1))
        out[e] = values.reshape(rows, groups * GROUP).t().to(dtype)
    return out


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``[E, in, out]`` (in-memory layout) -> ``(blocks [E, out, in/32, 16], scales [E, out, in/32])``.

    Each block of 32 input values shares the power-of-two scale ``2**ceil(log2(amax / 6))`` (the
    smallest that needs no clipping, as OpenAI's and triton_kernels' quantizers choose it); values
    round to the nearest FP4 value, ties to the even code.
    """
    if weight.dim() != 3:
        raise ValueError(f"expected an expert weight [E, in, out], got shape {tuple(weight.shape)}")
    experts, fan_in, rows = weight.shape
    if fan_in % GROUP:
        raise ValueError(f"MXFP4 needs the input dim to be a multiple of {GROUP}, got {fan_in}")
    groups = fan_in // GROUP
    # 2*|fp4 value| -> code: 0,1,2,3,4 -> same; 6 -> 5; 8 -> 6; 12 -> 7
    code_of_twice = torch.tensor([0, 1, 2, 3, 4, 0, 5, 0, 6, 0, 0, 0, 7], dtype=torch.uint8, device=weight.device)
    blocks = torch.empty(experts, rows, groups, GROUP // 2, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(experts, rows, groups, dtype=torch.uint8, device=weight.device)
    for e in range(experts):
        w = weight[e].t().to(torch.float32).contiguous().reshape(rows, groups, GROUP)
        amax = w.abs().amax(dim=-1)
        # frexp: amax/6 = m * 2**x with m in [0.5, 1); ceil(log2) is x, or x-1 when m == 0.5 exactly.
        mant, exp = torch.frexp(amax / FP4_MAX)
        exp = torch.where(mant == 0.5, exp - 1, exp)
        exp = torch.where(amax > 0, exp, torch.full_like(exp, -SCALE_BIAS)).clamp(-SCALE_BIAS, SCALE_BIAS)
        scaled = torch.ldexp(w, -exp.unsqueeze(-1))
        negative = torch.signbit(scaled)
        # Round |x| to the FP4 grid (steps 0.5 below 2, 1 below 4, 2 up to 6); torch.round's
        # half-to-even on each step gives ties-to-even codes.
        mag = scaled.abs_()
        twice = torch.where(mag < 2, torch.round(mag * 2), torch.where(mag < 4, torch.round(mag) * 2,
                                                                        torch.round(mag * 0.5) * 4))
        code = code_of_twice[twice.clamp_(max=12).long()] | (negative.to(torch.uint8) << 3)
        code = code.reshape(rows, groups, GROUP // 2, 2)
        blocks[e] = code[..., 0] | (code[..., 1] << 4)
        scales[e] = (exp + SCALE_BIAS).to(torch.uint8)
    return blocks, scales


def fake_quantize_mxfp4(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` after an MXFP4 round trip, same shape and dtype (to measure what quantizing costs)."""
    blocks, scales = quantize_mxfp4(weight)
    return dequantize_mxfp4(blocks, scales, weight.dtype)


MXFP4_BITS = 4 + 8 / GROUP  # 4-bit codes + one 8-bit E8M0 scale per 32 values = 4.25


def expert_bytes(num_params: int | float, fmt: str, dense_bytes: int = 2) -> float:
    """Bytes that ``num_params`` expert weights take resident in ``fmt`` (``mxfp4`` or ``bf16``/dense).

    MXFP4 is what :class:`ossforge.model.mxfp4_experts.MXFP4Tensor` holds (blocks + scales); ``dense_bytes`` is
    the element size of the dense format (2 for bf16, 4 for fp32). Expert biases (0.03% of the expert
    parameters) are counted at the same rate.
    """
    if fmt == "mxfp4":
        return num_params * MXFP4_BITS / 8
    if fmt in ("bf16", "dense"):
        return float(num_params * dense_bytes)
    raise ValueError(f"expert format must be 'mxfp4' or 'bf16', got {fmt!r}")
