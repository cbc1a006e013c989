"""Chunked LM-head + cross-entropy: the same loss and gradients as the full [tokens, vocab] logits
(fp32, <= 1e-6 relative), never saving those logits for backward, and the ``training.loss`` choice."""

from __future__ import annotations

import pytest
import torch

from ossforge.finetune import loss as L


def _frob(a, b):
    return float((a - b).norm() / b.norm())


def _head(kind: str, dtype, gen):
    head = torch.nn.Linear(32, 1000, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1000, 32, generator=gen, dtype=dtype))
    if kind == "lora":  # a LoRA-wrapped lm_head: the base weight frozen, A and B trained
        from peft import LoraConfig, get_peft_model

        holder = torch.nn.Module()
        holder.lm_head = head
        get_peft_model(holder, LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"]))
        head = holder.lm_head
        with torch.no_grad():
            head.lora_B.default.weight.copy_(torch.randn(1000, 4, generator=gen, dtype=dtype) * 0.05)
    return head


@pytest.mark.parametrize("kind", ["linear", "lora"])
@pytest.mark.parametrize("n", [1, 47, 200])  # below, at and above several chunk boundaries
def test_chunked_equals_full_loss_and_gradients(n, kind):
    """fp64: the same numbers (1e-12); fp32: within 1e-6 relative (summation order differs: each
    gradient is formed at unit scale and scaled afterwards)."""
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        gen = torch.Generator().manual_seed(n)
        head = _head(kind, dtype, gen)
        hidden = torch.randn(n, 32, generator=gen, dtype=dtype, requires_grad=True)
        targets = torch.randint(0, 1000, (n,), generator=gen)
        wrt = [hidden] + [p for p in head.parameters() if p.requires_grad]
        assert len(wrt) == (2 if kind == "linear" else 3)

        full = L.lm_loss("full", head, hidden, targets) / n
        g_full = torch.autograd.grad(full, wrt)
        chunked = L.chunked_lm_loss(head, hidden, targets, chunk=16) / n
        g_chunk = torch.autograd.grad(chunked, wrt)
        assert abs(chunked.item() - full.item()) <= tol * abs(full.item())
        for a, b in zip(g_chunk, g_full):
            assert _frob(a, b) <= tol, (dtype, _frob(a, b))
        with torch.no_grad():  # evaluation: plain chunks, same value
            assert abs(L.chunked_lm_loss(head, hidden, targets, chunk=16).item() / n - full.item()) <= tol * full.item()


def test_chunked_keeps_no_logits_at_the_real_vocabulary():
    """At gpt-oss's 201,088-token vocabulary, what autograd still holds for backward after the forward
    is the hidden states' gradient, not [tokens, vocab] logits (the full path holds them)."""
    import weakref

    from ossforge.model.presets import VOCAB_SIZE

    n, h = 2 * L.chunk_tokens(VOCAB_SIZE) + 5, 16  # three chunks
    head = torch.nn.Linear(h, VOCAB_SIZE, bias=False).requires_grad_(False)  # frozen, as under LoRA
    hidden = torch.randn(n, h, requires_grad=True)
    targets = torch.randint(0, VOCAB_SIZE, (n,))
    held, grads = {}, {}
    for implementation in ("chunked", "full"):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(weakref.ref(t)), t)[1], lambda t: t):
            out = L.lm_loss(implementation, head, hidden, targets)
        held[implementation] = sum(r().numel() * r().element_size() for r in saved if r() is not None)
        grads[implementation] = torch.autograd.grad(out, hidden)[0]
        del out
    assert _frob(grads["chunked"], grads["full"]) <= 1e-6
    assert held["full"] >= n * VOCAB_SIZE * 4
    assert held["chunked"] <= 2 * hidden.numel() * 4 + targets.numel() * 8, held
    assert held["chunked"] * 1000 < held["full"]


def test_compute_loss_chunked_equals_full_on_the_model(tiny_model):
    """compute_loss through the model (LoRA incl. lm_head, packed rows): chunked == full, loss and every
    LoRA gradient."""
    from ossforge.finetune.config import LoraConfig
    from ossforge.finetune.data import build_examples
    from ossforge.finetune.lora import apply_lora
    from ossforge.finetune.trainer import collate, compute_loss
    from ossforge.model.attention import apply_attention
    from tests.conftest import REPO

    torch.manual_seed(0)
    lora = LoraConfig(r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"])
    model = apply_attention(apply_lora(tiny_model, lora, None), "eager")
    assert type(model.get_output_embeddings()) is not torch.nn.Linear  # LoRA on the head: its grads too
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
    assert sum(1 for b in gf if b.abs().max() > 0) > len(gf) // 2
    # fp32 rounding through the whole network: 3.5e-6 measured (full vs itself run twice: 7e-8, from
    # the MoE's scatter order); the chunked algorithm itself is exact (fp64 above)
    flat_c, flat_f = torch.cat([g.flatten() for g in gc]), torch.cat([g.flatten() for g in gf])
    assert _frob(flat_c, flat_f) <= 1e-5


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
