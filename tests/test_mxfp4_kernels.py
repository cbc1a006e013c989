"""MXFP4-resident expert GEMMs: Triton (interpreter) and torch per-expert decode against dense dequantised weights.

MXFP4 -> float is exact, so every kernel fed packed W must equal the same kernel fed ``dequantize(W)`` up to fp32
rounding of the accumulation. Shapes are tiny: the interpreter is slow.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from ossforge.kernels import grouped_gemm, reference  # noqa: E402
from ossforge.kernels.moe_lora import lora_views, moe_lora  # noqa: E402
from ossforge.kernels.mxfp4 import MXFP4Weight  # noqa: E402
from ossforge.kernels.reference import LoraFactors  # noqa: E402
from ossforge.kernels.routing import sort_by_expert  # noqa: E402
from ossforge.model.mxfp4 import quantize_mxfp4  # noqa: E402

pytestmark = pytest.mark.skipif(not grouped_gemm.INTERPRET and not torch.cuda.is_available(),
                                reason="triton imported before TRITON_INTERPRET was set and no GPU")
DEVICE = torch.device("cpu" if grouped_gemm.INTERPRET else "cuda")
E = 4


def _rand(*shape, seed):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.5).to(DEVICE)


def _packed(fan_in, fan_out, seed):
    """``(MXFP4Weight [E, in, out], its dense fp32 dequantisation)``."""
    blocks, scales = quantize_mxfp4(_rand(E, fan_in, fan_out, seed=seed))
    w = MXFP4Weight(blocks, scales, torch.float32)
    return w, w.dequantize()


def _routing(kind, tokens, top_k, seed=0):
    logits = torch.randn(tokens, E, generator=torch.Generator().manual_seed(seed))
    if kind == "empty":
        logits[:, [1, 3]] = -1e4
    elif kind == "hot":
        logits[:, 2] = 1e4
    vals, idx = torch.topk(logits, top_k)
    return idx.to(DEVICE), torch.softmax(vals, -1).to(DEVICE)


def _close(a, b, rtol=1e-5, what=""):
    assert a.shape == b.shape, what
    if b.numel() == 0:
        return
    scale = b.abs().max().clamp_min(1e-6)
    assert (a - b).abs().max() <= rtol * scale, f"{what}: {(a - b).abs().max()} vs {scale}"


CASES = [("random", 5, 2), ("empty", 3, 2), ("hot", 7, 3), ("random", 0, 2)]


def test_packed_weight_views():
    w, dense = _packed(64, 24, seed=1)
    assert w.shape == dense.shape == (E, 64, 24)
    assert w.transpose(1, 2).shape == (E, 24, 64)
    assert torch.equal(w[2], dense[2]) and torch.equal(w.transpose(1, 2)[1], dense[1].t())
    assert w.nbytes() == E * 24 * 64 // 2 + E * 24 * 2  # 4.25 bits per parameter
    with pytest.raises(ValueError):
        w.transpose(0, 1)


@pytest.mark.parametrize("kind,tokens,top_k", CASES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gate_up_forward_packed_equals_dense(backend, kind, tokens, top_k):
    """Gather + bias + LoRA + SwiGLU epilogue over packed W1 [E, 32, 2*19]: N=38 is not a multiple of 16."""
    ops = grouped_gemm if backend == "triton" else reference
    idx, _ = _routing(kind, tokens, top_k)
    routing = sort_by_expert(idx, E)
    w, dense = _packed(32, 38, seed=2)
    x, b = _rand(tokens, 32, seed=3), _rand(E, 38, seed=4)
    lora = LoraFactors(_rand(E, 32, 3, seed=5), _rand(E, 3, 38, seed=6), 0.75)
    kw = dict(gather=True, bias=b, lora=lora, swiglu_out=True)
    got = ops.expert_matmul(x, w, routing, **kw)
    for g, r in zip(got, reference.expert_matmul(x, dense, routing, **kw)):
        _close(g, r, what=backend)
    if backend == "triton":  # and against today's bf16-path kernel on the dequantised weights
        for g, r in zip(got, grouped_gemm.expert_matmul(x, dense, routing, **kw)):
            _close(g, r)


@pytest.mark.parametrize("kind,tokens,top_k", CASES[:3])
def test_down_forward_and_transposed_packed(kind, tokens, top_k):
    """Down forward (row scale, scatter) and the dX GEMM over W^T, where K = out = 21 is not a multiple of 16."""
    idx, weights = _routing(kind, tokens, top_k)
    routing = sort_by_expert(idx, E)
    w, dense = _packed(32, 21, seed=7)
    a, bmat = lora_views(_rand(3 * E, 32, seed=8), _rand(21, 3 * E, seed=9), E)
    scale = weights.reshape(-1)[routing.perm].contiguous()
    act = _rand(tokens * top_k, 32, seed=10)
    kw = dict(bias=_rand(E, 21, seed=11), lora=LoraFactors(a.transpose(1, 2), bmat.transpose(1, 2), 1.5),
              row_scale=scale, scatter=True)
    want = reference.expert_matmul(act, dense, routing, **kw)
    for ops in (grouped_gemm, reference):
        for g, r in zip(ops.expert_matmul(act, w, routing, **kw), want):
            if r is not None:
                _close(g, r)
    dout = _rand(tokens, 21, seed=12)
    kw = dict(gather=True, lora=LoraFactors(bmat, a, 1.5))
    want = grouped_gemm.expert_matmul(dout, dense.transpose(1, 2), routing, **kw)
    for ops in (grouped_gemm, reference):
        got = ops.expert_matmul(dout, w.transpose(1, 2), routing, **kw)
        _close(got[0], want[0])
        _close(got[2], want[2])


@pytest.mark.parametrize("kind,tokens,top_k", CASES[:3])
def test_down_backward_packed_equals_dense(kind, tokens, top_k):
    """dSwiGLU epilogue over packed W2^T (I = 32 in, H = 21 out)."""
    idx, weights = _routing(kind, tokens, top_k)
    routing = sort_by_expert(idx, E)
    w, dense = _packed(32, 21, seed=13)
    h = _rand(tokens * top_k, 64, seed=14) * 12
    a, bmat = lora_views(_rand(3 * E, 32, seed=15), _rand(21, 3 * E, seed=16), E)
    scale = weights.reshape(-1)[routing.perm].contiguous()
    dout = _rand(tokens, 21, seed=17)
    lora = LoraFactors(bmat, a, 1.5)
    want = grouped_gemm.down_backward(dout, dense.transpose(1, 2), routing, h, scale, lora)
    got = grouped_gemm.down_backward(dout, w.transpose(1, 2), routing, h, scale, lora)
    ref = reference.down_backward(dout.index_select(0, routing.token_of_row), w.transpose(1, 2), routing, h,
                                  scale, lora)
    for name, g, r, t in zip(("dh", "act", "g_dot_act", "dyl"), got, want, ref):
        _close(g, r, what=name)
        _close(t, r, what=f"torch {name}")


def _layer(tokens, top_k, kind, seed=0, h=32, i=32, r=3):
    idx, weights = _routing(kind, tokens, top_k, seed)
    w1, dense1 = _packed(h, 2 * i, seed=seed + 2)
    w2, dense2 = _packed(i, h, seed=seed + 4)
    params = [_rand(tokens, h, seed=seed + 1), weights, _rand(E, 2 * i, seed=seed + 3), _rand(E, h, seed=seed + 5),
              _rand(r * E, h, seed=seed + 6), _rand(2 * i, r * E, seed=seed + 7),
              _rand(r * E, i, seed=seed + 8), _rand(h, r * E, seed=seed + 9)]
    return idx, (w1, dense1, w2, dense2), [p.requires_grad_() for p in params]


@pytest.mark.parametrize("kind,tokens,top_k", [("random", 6, 2), ("hot", 5, 2), ("random", 0, 2)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_moe_lora_packed_layer_equals_dequantised(backend, kind, tokens, top_k):
    """Output and every gradient (x, router weights, biases, all four LoRA factors) of the whole layer."""
    idx, (w1, dense1, w2, dense2), params = _layer(tokens, top_k, kind)
    x, rw, b1, b2, a1, bb1, a2, bb2 = params
    grad = _rand(tokens, 32, seed=99)
    results = []
    for gate_up, down in ((w1, w2), (dense1, dense2)):
        out = moe_lora(x, rw, idx, gate_up, b1, down, b2, (a1, bb1, 0.7), (a2, bb2, 1.3), backend=backend)
        results.append([out, *torch.autograd.grad(out, params, grad)])
    for name, g, r in zip("out x rw b1 b2 A1 B1 A2 B2".split(), *results):
        _close(g, r, what=f"{backend} {name}")


def test_torch_path_decodes_one_expert_at_a_time(monkeypatch):
    """The CPU path never holds more than one dense expert: every decode is of a single, non-empty expert."""
    import ossforge.kernels.mxfp4 as mx

    idx, (w1, _, w2, _), params = _layer(6, 2, "random")
    decoded = []
    real = mx.dequantize_mxfp4
    monkeypatch.setattr(mx, "dequantize_mxfp4", lambda b, s, d: decoded.append(b.shape[0]) or real(b, s, d))
    idx[:, :] = torch.tensor([0, 2])  # experts 1 and 3 get no rows
    x, rw, b1, b2, a1, bb1, a2, bb2 = params
    out = moe_lora(x, rw, idx, w1, b1, w2, b2, (a1, bb1, 0.7), (a2, bb2, 1.3), backend="torch")
    out.sum().backward()
    assert decoded == [1] * 8  # 2 experts x (gate/up, down forward; down backward, dX over W1^T)
