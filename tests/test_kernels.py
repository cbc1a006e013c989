"""Each MoE kernel against its torch reference on edge cases; Triton runs in the CPU interpreter.

With ``TRITON_INTERPRET=0`` on a machine with a GPU the same tests run the compiled kernels on CUDA
(fp32 tiles use IEEE dots there, so the tolerances hold): ``TRITON_INTERPRET=0 pytest tests/test_kernels.py``.

TRITON_INTERPRET must be set before triton compiles anything, hence before the kernels module import.
Shapes are tiny and odd (K not a multiple of the 16-wide blocks, T below one block) because the
interpreter is slow.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from ossforge.kernels import grouped_gemm, reference  # noqa: E402
from ossforge.kernels.moe_lora import lora_views, moe_lora, resolve_backend  # noqa: E402
from ossforge.kernels.reference import LoraFactors, moe_reference, swiglu, swiglu_backward  # noqa: E402
from ossforge.kernels.routing import (  # noqa: E402
    sort_by_expert,
    sort_by_expert_reference,
    tile_table,
    tile_table_reference,
)

pytestmark = pytest.mark.skipif(not grouped_gemm.INTERPRET and not torch.cuda.is_available(),
                                reason="triton imported before TRITON_INTERPRET was set and no GPU")

E = 5
DEVICE = torch.device("cpu" if grouped_gemm.INTERPRET else "cuda")

if not grouped_gemm.INTERPRET:
    # On CUDA these tests check what the kernels compute, not the tuning: one small config per kernel keeps the
    # fp32 (IEEE dot) variants compiling in seconds instead of autotuning every config for every tiny shape.
    grouped_gemm._expert_matmul_kernel.configs = [
        c for c in grouped_gemm._mm_configs() if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) == (64, 64, 4)]
    grouped_gemm._expert_tn_kernel.configs = [
        c for c in grouped_gemm._tn_configs() if (c.kwargs["BLOCK_P"], c.kwargs["BLOCK_Q"]) == (16, 128)]


def _routing_index(kind: str, tokens: int, top_k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, E, generator=gen)
    if kind == "empty":  # experts 1 and 3 never chosen
        logits[:, [1, 3]] = -1e4
    elif kind == "hot":  # every token's first choice is expert 2
        logits[:, 2] = 1e4
    elif kind == "one_expert":  # top_k = 1, everything on expert 4
        logits[:, 4] = 1e4
    vals, idx = torch.topk(logits, top_k)
    return idx.to(DEVICE), torch.softmax(vals, -1).to(DEVICE)


CASES = [("random", 13, 2), ("empty", 9, 2), ("hot", 11, 3), ("one_expert", 7, 1), ("random", 3, 2)]


@pytest.mark.parametrize("kind,tokens,top_k", CASES)
def test_routing_matches_reference(kind, tokens, top_k):
    idx, _ = _routing_index(kind, tokens, top_k)
    routing = sort_by_expert(idx, E)
    perm, counts = sort_by_expert_reference(idx, E)
    assert routing.perm.tolist() == perm and routing.counts.tolist() == counts
    assert routing.offsets.dtype == torch.int64 and routing.offsets.tolist()[-1] == tokens * top_k
    assert routing.token_of_row.tolist() == [p // top_k for p in perm]
    for block in (4, 16):
        expert, start, max_tiles = tile_table(routing, block)
        real = [(int(e), int(s)) for e, s in zip(expert, start) if e >= 0]
        assert real == tile_table_reference(counts, block)
        assert max_tiles >= len(real) and (expert[len(real):] == -1).all()


def test_swiglu_backward_matches_autograd():
    h = torch.linspace(-9, 9, 2 * 37, dtype=torch.float64).reshape(1, -1).repeat(3, 1)
    h[1] = h[1].flip(0)
    h[2, ::2] = 7.0  # exactly at the limit
    h.requires_grad_()
    g = torch.randn(3, 37, dtype=torch.float64)
    (expected,) = torch.autograd.grad(swiglu(h), h, g)
    torch.testing.assert_close(swiglu_backward(h.detach(), g), expected)


def _rand(*shape, seed):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.5).to(DEVICE)


def _close(a, b, rtol=2e-5, what=""):
    assert a.shape == b.shape, what
    scale = b.abs().max().clamp_min(1e-6)
    assert (a - b).abs().max() <= rtol * scale, f"{what}: {(a - b).abs().max()} vs {scale}"


@pytest.mark.parametrize("kind,tokens,top_k", CASES)
def test_expert_matmul_gate_up_matches_reference(kind, tokens, top_k):
    """Gathered rows, bias, LoRA, SwiGLU epilogue: K=21 and N=2*19 are not multiples of 16."""
    idx, _ = _routing_index(kind, tokens, top_k)
    routing = sort_by_expert(idx, E)
    x, w, b = _rand(tokens, 21, seed=1), _rand(E, 21, 38, seed=2), _rand(E, 38, seed=3)
    lora = LoraFactors(_rand(E, 21, 3, seed=4), _rand(E, 3, 38, seed=5), 0.75)
    got = grouped_gemm.expert_matmul(x, w, routing, gather=True, bias=b, lora=lora, swiglu_out=True)
    want = reference.expert_matmul(x, w, routing, gather=True, bias=b, lora=lora, swiglu_out=True)
    for g, r in zip(got, want):
        _close(g, r)


@pytest.mark.parametrize("kind,tokens,top_k", CASES[:3])
def test_expert_matmul_down_scatter_and_transposed(kind, tokens, top_k):
    """Row scale + scatter to slot order (forward down) and strided W^T / LoRA views (backward)."""
    idx, weights = _routing_index(kind, tokens, top_k)
    routing = sort_by_expert(idx, E)
    act, w = _rand(tokens * top_k, 19, seed=6), _rand(E, 19, 21, seed=7)
    a, bmat = lora_views(_rand(3 * E, 19, seed=8), _rand(21, 3 * E, seed=9), E)  # peft layout views
    lora = LoraFactors(a.transpose(1, 2), bmat.transpose(1, 2), 1.5)
    scale = weights.reshape(-1)[routing.perm].contiguous()
    kw = dict(bias=_rand(E, 21, seed=10), lora=lora, row_scale=scale, scatter=True)
    for g, r in zip(grouped_gemm.expert_matmul(act, w, routing, **kw), reference.expert_matmul(act, w, routing, **kw)):
        if r is not None:
            _close(g, r)
    dout = _rand(tokens, 21, seed=11)
    kw = dict(gather=True, lora=LoraFactors(bmat, a, 1.5))
    got = grouped_gemm.expert_matmul(dout, w.transpose(1, 2), routing, **kw)
    want = reference.expert_matmul(dout, w.transpose(1, 2), routing, **kw)
    _close(got[0], want[0])
    _close(got[2], want[2])


@pytest.mark.parametrize("kind,tokens,top_k", CASES[:3])
def test_down_backward_matches_reference(kind, tokens, top_k):
    """dSwiGLU epilogue: h read and dh written as contiguous interleaved tiles; I=37 spans 3 column tiles."""
    idx, weights = _routing_index(kind, tokens, top_k)
    routing = sort_by_expert(idx, E)
    w, h = _rand(E, 37, 21, seed=16), _rand(tokens * top_k, 74, seed=17) * 12  # reaches past the clamp limit
    a, bmat = lora_views(_rand(3 * E, 37, seed=18), _rand(21, 3 * E, seed=19), E)
    scale = weights.reshape(-1)[routing.perm].contiguous()
    dout = _rand(tokens, 21, seed=20)
    got = grouped_gemm.down_backward(dout, w.transpose(1, 2), routing, h, scale, LoraFactors(bmat, a, 1.5))
    want = reference.down_backward(dout.index_select(0, routing.token_of_row), w.transpose(1, 2), routing, h,
                                   scale, LoraFactors(bmat, a, 1.5))
    for name, g, r in zip(("dh", "act", "g_dot_act", "dyl"), got, want):
        _close(g, r, what=name)


@pytest.mark.parametrize("kind,tokens,top_k", CASES)
def test_expert_tn_matches_reference(kind, tokens, top_k):
    idx, _ = _routing_index(kind, tokens, top_k)
    routing = sort_by_expert(idx, E)
    left, right = _rand(tokens * top_k, 3, seed=12), _rand(tokens, 21, seed=13)
    kw = dict(gather_right=True)
    got = grouped_gemm.expert_tn(left, right, routing, **kw)
    _close(got, reference.expert_tn(left, right, routing, **kw))
    x, dh = _rand(tokens, 17, seed=14), _rand(tokens * top_k, 38, seed=15)
    got = grouped_gemm.expert_tn(x, dh, routing, gather_left=True)
    want = reference.expert_tn(x, dh, routing, gather_left=True)
    _close(got, want)
    if kind == "empty":
        assert (got[1] == 0).all() and (got[3] == 0).all()


def _layer(tokens, top_k, kind, seed=0, h=21, i=19, r=3):
    idx, weights = _routing_index(kind, tokens, top_k, seed)
    params = [_rand(tokens, h, seed=seed + 1), weights,
              _rand(E, h, 2 * i, seed=seed + 2), _rand(E, 2 * i, seed=seed + 3),
              _rand(E, i, h, seed=seed + 4), _rand(E, h, seed=seed + 5),
              _rand(r * E, h, seed=seed + 6), _rand(2 * i, r * E, seed=seed + 7),
              _rand(r * E, i, seed=seed + 8), _rand(h, r * E, seed=seed + 9)]
    return idx, [p.requires_grad_() for p in params]


def _run(backend, idx, params, grad):
    x, rw, w1, b1, w2, b2, a1, bb1, a2, bb2 = params
    out = moe_lora(x, rw, idx, w1, b1, w2, b2, (a1, bb1, 0.7), (a2, bb2, 1.3), backend=backend)
    return [out, *torch.autograd.grad(out, params, grad)]


@pytest.mark.parametrize("kind,tokens,top_k", [("random", 13, 2), ("empty", 9, 2), ("one_expert", 3, 1)])
def test_moe_lora_forward_backward_all_backends(kind, tokens, top_k):
    """Triton and torch backends against the token-by-token autograd reference (all 10 gradients)."""
    idx, params = _layer(tokens, top_k, kind)
    grad = _rand(tokens, 21, seed=99)
    x, rw, w1, b1, w2, b2, a1, bb1, a2, bb2 = params
    a1v, b1v = lora_views(a1, bb1, E)
    a2v, b2v = lora_views(a2, bb2, E)
    out = moe_reference(x, idx, rw, w1, b1, w2, b2, (a1v, b1v, 0.7), (a2v, b2v, 1.3))
    want = [out, *torch.autograd.grad(out, params, grad)]
    for backend in ("torch", "triton"):
        got = _run(backend, idx, params, grad)
        for name, g, r in zip("out x rw w1 b1 w2 b2 A1 B1 A2 B2".split(), got, want):
            _close(g, r, rtol=1e-5, what=f"{backend} {name}")


@pytest.mark.parametrize("epilogue_rows", [1, 5])
def test_torch_path_epilogue_chunks(monkeypatch, epilogue_rows):
    """The torch path runs its epilogues over runs of experts; tiny runs must give the same result."""
    idx, params = _layer(13, 2, "empty", seed=3)
    grad = _rand(13, 21, seed=98)
    want = _run("torch", idx, params, grad)
    monkeypatch.setattr(reference, "EPILOGUE_ROWS", epilogue_rows)
    for g, r in zip(_run("torch", idx, params, grad), want):
        _close(g, r, rtol=1e-6)


def test_frozen_experts_skip_base_grads():
    idx, params = _layer(9, 2, "random")
    for p in params[2:6]:
        p.requires_grad_(False)
    x, rw, w1, b1, w2, b2, a1, bb1, a2, bb2 = params
    out = moe_lora(x, rw, idx, w1, b1, w2, b2, (a1, bb1, 0.7), (a2, bb2, 1.3), backend="triton")
    out.sum().backward()
    assert all(p.grad is None for p in params[2:6])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (x, rw, a1, bb1, a2, bb2))


def test_backend_selection(monkeypatch):
    monkeypatch.delenv("OSSFORGE_MOE_BACKEND", raising=False)
    assert resolve_backend(torch.device("cpu")) == "torch"
    assert resolve_backend(torch.device("cuda")) == "triton"
    monkeypatch.setenv("OSSFORGE_MOE_BACKEND", "triton")
    assert resolve_backend(torch.device("cpu")) == "triton"
    monkeypatch.setenv("OSSFORGE_MOE_BACKEND", "cuda")
    with pytest.raises(ValueError):
        resolve_backend(torch.device("cpu"))


def test_fuse_moe_triton_backend_matches_stock_peft():
    """The whole tiny gpt-oss + peft expert LoRA model, forward and backward, on the Triton kernels."""
    import copy

    from peft import LoraConfig, get_peft_model

    from ossforge.model import fuse_moe
    from ossforge.model.presets import build_random

    model = build_random("tiny", seed=5, hidden_size=48, intermediate_size=40, num_local_experts=5).to(DEVICE)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj"],
                                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    fused = fuse_moe(copy.deepcopy(model), backend="triton")
    ids = torch.tensor([[200006, 1428, 200008, 12194, 0, 13, 200007, 200006, 173781]], device=DEVICE)
    results = []
    for m in (model, fused):
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append([out.logits.detach()] + [p.grad for p in m.parameters() if p.requires_grad])
    for g, r in zip(results[1], results[0]):
        _close(g, r, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_moe_lora_zero_tokens(backend):
    """T=0 (an expert-parallel rank that received no rows): [0, H] out, [0, .] input grads, zero weight grads."""
    idx, params = _layer(0, 2, "random")
    got = _run(backend, idx, params, _rand(0, 21, seed=97))
    assert got[0].shape == (0, 21) and got[0].requires_grad
    assert got[1].shape == (0, 21) and got[2].shape == (0, 2)
    for g, p in zip(got[3:], params[2:]):
        assert g.shape == p.shape and g.dtype == p.dtype and not g.any()
    x, rw, w1, b1, w2, b2, a1, bb1, a2, bb2 = params
    for p in params:
        p.grad = None
    out = moe_lora(x, rw, idx, w1, b1, w2, b2, (a1, bb1, 0.7), (a2, bb2, 1.3), backend=backend)
    out.sum().backward()  # the usual .backward() route fills .grad with zeros
    assert all(p.grad is not None and not p.grad.any() for p in (a1, bb1, a2, bb2))
