"""Attention with sinks: the LSE renormalisation of the flex path equals the stock eager formula
(forward and the gradients of q, k, v and the sinks), flex attention itself on CPU (forward: torch's
FlexAttention has no CPU backward), and the ``training.attention`` choice."""

from __future__ import annotations

import warnings

import pytest
import torch

from ossforge.model import attention as attn


def _inputs(B=2, H=4, KV=2, S=37, D=8, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, S, D, generator=gen, dtype=dtype) for h in (H, KV, KV))
    sinks = torch.randn(H, generator=gen, dtype=dtype) * 2
    # row 0: documents of 15, 1 and 21 tokens; row 1: one document of 30 tokens, then 7 pads
    pos = torch.stack([torch.cat([torch.arange(15), torch.arange(1), torch.arange(21)]),
                       torch.cat([torch.arange(30), torch.zeros(7, dtype=torch.long)])])
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 30:] = 0
    return q, k, v, sinks, attn.document_ids_of(attn.mask_positions(pos, mask)), pos, mask


def test_sink_renormalisation_equals_softmax_with_sink():
    """softmax([s, sink])[:-1] == exp(s - lse') with lse' = logaddexp(lse, sink), incl. a sink far
    above and far below the scores."""
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 4, 5, 9, generator=gen, dtype=torch.float64)
    for shift in (0.0, 30.0, -30.0):
        sinks = torch.randn(4, generator=gen, dtype=torch.float64) + shift
        want = torch.softmax(torch.cat([scores, sinks.view(1, -1, 1, 1).expand(3, 4, 5, 1)], -1), -1)[..., :-1]
        lse = torch.logsumexp(scores, -1)
        got = torch.exp(scores - torch.logaddexp(lse, sinks.view(1, -1, 1)).unsqueeze(-1))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
        eye = torch.eye(9, dtype=torch.float64).expand(3, 4, 9, 9)  # out = probs @ I: the probabilities
        torch.testing.assert_close(attn.sink_renormalise(torch.softmax(scores, -1) @ eye, lse, sinks), want)


@pytest.mark.parametrize("window", [None, 6])
def test_reference_gradients_equal_eager(window):
    """The flex path's math (output and LSE over the scores, then sink_renormalise) against the stock
    eager formula, documents + padding + sliding window: outputs and q/k/v/sink gradients (fp64)."""
    q, k, v, sinks, docs, _, _ = _inputs()
    ok = attn.allowed(docs, window)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    twins = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    got = attn.reference_attention(*leaves, ok, 8 ** -0.5)
    want = attn.eager_sink_attention(*twins, ok, 8 ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, leaves, g)
    ref = torch.autograd.grad(want, twins, g)
    for name, a, b in zip("q k v sinks".split(), grads, ref):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)
    # without the LSE's gradient the q and k gradients come out wrong (the trap a forward-only
    # sink kernel falls into)
    detached = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    groups = 2
    kk, vv = detached[1].repeat_interleave(groups, 1), detached[2].repeat_interleave(groups, 1)
    s = (detached[0] @ kk.transpose(-1, -2) * 8 ** -0.5).masked_fill(~ok[:, None], float("-inf"))
    bad = attn.sink_renormalise(torch.softmax(s, -1) @ vv, torch.logsumexp(s, -1).detach(), detached[3])
    bad_dq = torch.autograd.grad(bad, detached[0], g)[0]
    assert (bad_dq - ref[0]).abs().max() > 1e-3


def test_allowed_mask_rules():
    _, _, _, _, docs, _, _ = _inputs()
    ok = attn.allowed(docs, 6)
    assert ok[0, 14, 9] and not ok[0, 14, 8]  # window 6 inside the first document
    assert not ok[0, 15, 14] and ok[0, 15, 15]  # the one-token document sees only itself
    assert not ok[0, 16, 15] and ok[0, 16, 16]  # a new document starts
    assert ok[1, 31, 31] and not ok[1, 31, 29] and not ok[1, 31, 30]  # padding: each token alone


def test_flex_forward_on_cpu_equals_eager():
    """torch's flex attention (uncompiled on CPU, no grad) through flex_sink_attention with the
    BlockMask the model's hook builds equals the eager formula: fp32, documents, padding, window."""
    from torch.nn.attention.flex_attention import create_block_mask

    q, k, v, sinks, docs, _, _ = _inputs(dtype=torch.float32)
    for window in (None, 6):
        def mask_mod(b, h, qi, ki, window=window):
            keep = (docs[b, qi] == docs[b, ki]) & (qi >= ki)
            return keep & (qi - ki < window) if window else keep

        block_mask = create_block_mask(mask_mod, 2, None, 37, 37, device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
            got, _ = attn.flex_sink_attention(None, q, k, v, block_mask, scaling=8 ** -0.5, s_aux=sinks)
        want = attn.eager_sink_attention(q, k, v, sinks, attn.allowed(docs, window), 8 ** -0.5)
        torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_model_with_flex_equals_eager_on_packed_rows():
    """The whole tiny model (sliding window 8, two documents + padding) gives the same logits with
    training.attention flex (forward on CPU) as with eager, and the same as each document alone."""
    from ossforge.model.presets import build_random

    model = build_random("tiny", seed=0, sliding_window=8, initializer_range=0.2).eval()
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 5000, (20,), generator=gen), torch.randint(0, 5000, (13,), generator=gen)
    ids = torch.stack([torch.cat([a, b]), torch.cat([b, torch.zeros(20, dtype=torch.long)])])
    pos = torch.stack([torch.cat([torch.arange(20), torch.arange(13)]), torch.cat([torch.arange(13), torch.zeros(20, dtype=torch.long)])])
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0
    outs = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for impl in ("eager", "flex"):
            attn.apply_attention(model, impl)
            assert model.config._attn_implementation == ("eager" if impl == "eager" else attn.FLEX)
            outs[impl] = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        attn.apply_attention(model, "eager")
        alone = model(input_ids=b[None], position_ids=torch.arange(13)[None], use_cache=False).logits[0]
    real = mask.bool()
    # fp32 GEMMs of other shapes (33 vs 13 rows) round differently: up to 1.6e-5 on logits of up to 8.3 on
    # one CPU (AMX), under 1e-5 on another. Attention across the document boundary moves them by > 1e-2.
    close = dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(outs["flex"][real], outs["eager"][real], **close)
    torch.testing.assert_close(outs["eager"][0, 20:], alone, **close)
    torch.testing.assert_close(outs["flex"][1, :13], alone, **close)
    with torch.no_grad():  # the same row as one document: what crossing the boundary would give
        crossed = model(input_ids=ids[:1], position_ids=torch.arange(33)[None], use_cache=False).logits[0, 20:]
    assert (crossed - alone).abs().max() > 1e-2


def test_attention_choice():
    from ossforge.errors import UserError
    from ossforge.finetune.config import TrainingConfig

    assert TrainingConfig().attention == "auto"
    assert attn.resolve_attention("auto", "cpu") == "eager"
    assert attn.resolve_attention("auto", "cuda") == "flex"
    assert attn.resolve_attention("eager", "cuda") == "eager"
    with pytest.raises(UserError, match="training.attention: flex needs a CUDA device"):
        attn.resolve_attention("flex", "cpu")
    with pytest.raises(ValueError):
        TrainingConfig(attention="sdpa")


def test_gpu_selfcheck_needs_cuda():
    """gpu_selfcheck is the GPU check's entry point; on a machine without CUDA it cannot run silently."""
    if torch.cuda.is_available():
        result = attn.gpu_selfcheck()
        assert result["passed"], result
    else:
        with pytest.raises((RuntimeError, AssertionError)):
            attn.gpu_selfcheck()
