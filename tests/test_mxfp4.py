"""MXFP4 quantization against transformers' own dequantization of the published format."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.mxfp4 import FP4_VALUES as HF_FP4_VALUES
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from ossforge.model.mxfp4 import FP4_VALUES, GROUP, dequantize_mxfp4, fake_quantize_mxfp4, quantize_mxfp4


def _weights(experts=3, fan_in=64, fan_out=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Per-column magnitudes spread over several octaves so blocks get different scales.
    spread = torch.exp2(torch.randint(-6, 3, (experts, 1, fan_out), generator=g).float())
    return torch.randn(experts, fan_in, fan_out, generator=g) * spread


def test_code_table_matches_transformers():
    assert list(FP4_VALUES) == list(HF_FP4_VALUES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_equals_transformers_dequantization(dtype):
    w = _weights()
    blocks, scales = quantize_mxfp4(w)
    # Published layout: the stored matrix is [E, out, in] in blocks of 32 along `in`.
    assert blocks.shape == (3, 96, 64 // GROUP, GROUP // 2) and blocks.dtype == torch.uint8
    assert scales.shape == (3, 96, 64 // GROUP) and scales.dtype == torch.uint8
    ours = dequantize_mxfp4(blocks, scales, dtype)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert ours.shape == theirs.shape == w.shape  # back in the in-memory [E, in, out] layout
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)


def test_quantization_error_is_bounded_by_half_the_top_step():
    w = _weights(seed=1)
    blocks, scales = quantize_mxfp4(w)
    dq = dequantize_mxfp4(blocks, scales, torch.float32)
    # Per block the scale is 2**(byte-127); the largest FP4 step (4 -> 6) is 2 scale units, so the
    # rounding error is at most one scale unit, and the block maximum never clips.
    unit = torch.exp2(scales.float() - 127).repeat_interleave(GROUP, dim=-1).transpose(1, 2)
    err = (dq - w).abs()
    assert (err <= unit).all()
    assert (err / w.abs().clamp_min(1e-30))[w.abs() > unit * 2].max() < 0.26  # relative error off tiny values
    assert err.mean() < 0.15 * w.abs().mean()  # ~11% for Gaussian weights: MXFP4 is coarse


def test_representable_values_survive_exactly():
    w = _weights(seed=2)
    once = fake_quantize_mxfp4(w)
    assert torch.equal(fake_quantize_mxfp4(once), once)


def test_known_encoding():
    # One block of 32 inputs for one output: 6 * 2**-3 sets the scale to 2**-3 (byte 124).
    col = torch.tensor(FP4_VALUES[:8] * 4) * 2.0**-3
    col[0] = -6 * 2.0**-3
    w = col.reshape(1, GROUP, 1)
    blocks, scales = quantize_mxfp4(w)
    assert scales.tolist() == [[[124]]]
    assert blocks[0, 0, 0, 0].item() == (0xF | (1 << 4))  # low nibble: -6 (code 15); high: +0.5 (code 1)
    assert blocks[0, 0, 0, 1].item() == (2 | (3 << 4))  # 1.0, 1.5
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.float32), w)


def test_ties_round_to_even_codes_and_zero_blocks():
    # Scale 1 (amax 6); 0.75 -> 1.0, 1.25 -> 1.0, 2.5 -> 2.0, 5.0 -> 4.0, 0.25 -> 0.
    vals = torch.zeros(GROUP)
    vals[:6] = torch.tensor([6.0, 0.75, 1.25, 2.5, 5.0, 0.25])
    w = torch.stack([vals, torch.zeros(GROUP)], dim=-1).unsqueeze(0)  # second output: all zero
    dq = fake_quantize_mxfp4(w)
    assert dq[0, :6, 0].tolist() == [6.0, 1.0, 1.0, 2.0, 4.0, 0.0]
    assert torch.equal(dq[0, :, 1], torch.zeros(GROUP))


def test_published_gate_up_layout():
    """gate_up_proj_blocks [E, 2I, H/32, 16] dequantizes to the model's gate_up_proj [E, H, 2I]."""
    E, H, I = 2, 64, 32
    gate_up = _weights(E, H, 2 * I, seed=3)
    blocks, scales = quantize_mxfp4(gate_up)
    assert blocks.shape == (E, 2 * I, H // GROUP, 16)
    dq = dequantize_mxfp4(blocks, scales, torch.float32)
    assert dq.shape == (E, H, 2 * I)
    # Column j of expert e (output feature j) lives in row j of the stored blocks.
    single_b, single_s = quantize_mxfp4(gate_up[1:2, :, 5:6])
    assert torch.equal(single_b[0, 0], blocks[1, 5]) and torch.equal(single_s[0, 0], scales[1, 5])


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.zeros(1, 40, 8))
    with pytest.raises(ValueError, match="do not match"):
        dequantize_mxfp4(torch.zeros(1, 2, 3, 16, dtype=torch.uint8), torch.zeros(1, 2, 4, dtype=torch.uint8))
