"""Chunked LM-head + cross-entropy: the same loss and gradients as the full [tokens, vocab] logits
(fp32, <= 1e-6 relative), never saving those logits for backward, and the ``training.loss`` choice."""

from __future__ import annotations

import pytest
import torch

from ossforge.finetune import loss as L


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("n", [1, 47, 200])  # below, at and above several chunk boundaries
def test_chunked_equals_full_loss_and_gradients(n):
    gen = torch.Generator().manual_seed(n)
    head = torch.nn.Linear(32, 1000, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1000, 32, generator=gen))
    hidden = torch.randn(n, 32, generator=gen, requires_grad=True)
    targets = torch.randint(0, 1000, (n,), generator=gen)

    full = L.lm_loss("full", head, hidden, targets)
    g_full = torch.autograd.grad(full, (hidden, head.weight))
    chunked = L.chunked_lm_loss(head, hidden, targets, chunk=16)
    g_chunk = torch.autograd.grad(chunked, (hidden, head.weight))
    assert abs(chunked.item() - full.item()) <= 1e-6 * abs(full.item())
    for a, b in zip(g_chunk, g_full):
        assert _rel(a, b) <= 1e-6
    with torch.no_grad():  # evaluation: no checkpointing, same value
        torch.testing.assert_close(L.chunked_lm_loss(head, hidden, targets, chunk=16), full, rtol=1e-6, atol=0)


def test_chunked_saves_no_logits_at_the_real_vocabulary():
    """At gpt-oss's 201,088-token vocabulary, what autograd keeps for backward is the hidden states
    (and the targets), not [tokens, vocab] logits: the full path keeps > 100x more."""
    from ossforge.model.presets import VOCAB_SIZE

    n, h = 2 * L.chunk_tokens(VOCAB_SIZE) + 5, 16  # three chunks
    head = torch.nn.Linear(h, VOCAB_SIZE, bias=False)
    hidden = torch.randn(n, h, requires_grad=True)
    targets = torch.randint(0, VOCAB_SIZE, (n,))
    saved = {}

    def measure(implementation):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = L.lm_loss(implementation, head, hidden, targets)
        out.backward()
        saved[implementation] = total
        return hidden.grad.clone()

    g_chunked = measure("chunked")
    hidden.grad = None
    g_full = measure("full")
    assert _rel(g_chunked, g_full) <= 1e-6
    logits_bytes = n * VOCAB_SIZE * 4
    assert saved["full"] >= logits_bytes
    assert saved["chunked"] <= 4 * hidden.numel() * hidden.element_size() + 64 * n
    assert saved["chunked"] * 100 < saved["full"]


def test_compute_loss_chunked_equals_full_on_the_model(tiny_model):
    """compute_loss through the model (LoRA, packed rows): chunked == full, loss and every LoRA gradient."""
    from ossforge.finetune.config import LoraConfig
    from ossforge.finetune.data import build_examples
    from ossforge.finetune.lora import apply_lora
    from ossforge.finetune.trainer import collate, compute_loss
    from ossforge.model.attention import apply_attention
    from tests.conftest import REPO

    torch.manual_seed(0)
    model = apply_attention(apply_lora(tiny_model, LoraConfig(r=4, alpha=8), None), "eager")
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # peft starts B at zero: make the adapter matter
    examples, _ = build_examples(REPO / "tests" / "fixtures" / "train" / "dosing_small.jsonl", 400, packing=True)
    batch = collate(examples[:2], "cpu")
    results = {}
    for implementation in ("full", "chunked"):
        model.ossforge_loss = implementation
        loss = compute_loss(model, batch)
        params = [p for p in model.parameters() if p.requires_grad]
        results[implementation] = (loss.detach(), torch.autograd.grad(loss, params))
    (lf, gf), (lc, gc) = results["full"], results["chunked"]
    assert abs(lc.item() - lf.item()) <= 1e-6 * abs(lf.item())
    assert all(_rel(a, b) <= 1e-6 for a, b in zip(gc, gf) if b.abs().max() > 0)


def test_loss_choice():
    from ossforge.errors import UserError
    from ossforge.finetune.config import TrainingConfig

    assert TrainingConfig().loss == "auto"
    head = torch.nn.Linear(4, 8, bias=False)
    assert L.resolve_loss("auto", "cpu", head) == "chunked"
    assert L.resolve_loss("auto", "cuda", head) == ("liger" if L.has_liger() else "chunked")
    assert L.resolve_loss("full", "cpu", head) == "full"
    wrapped = torch.nn.Sequential(head)  # not a plain Linear (e.g. LoRA on lm_head): Liger cannot read it
    assert L.resolve_loss("auto", "cuda", wrapped) == "chunked"
    with pytest.raises(UserError, match="training.loss: liger needs a CUDA device"):
        L.resolve_loss("liger", "cpu", head)
    with pytest.raises(ValueError):
        TrainingConfig(loss="fused")
    assert L.chunk_tokens(201088) == 333
