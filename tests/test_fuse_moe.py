"""fuse_moe on real tiny gpt-oss models: same outputs and gradients as transformers (+ peft), same files."""

from __future__ import annotations

import copy

import pytest
import torch

from ossforge.model import fuse_moe
from ossforge.model.fused_moe import FusedGptOssMLP, unfuse_moe
from ossforge.model.presets import build_random

IDS = torch.tensor([[200006, 17360, 200008, 3575, 553, 261, 10297, 29186, 13, 200007, 200006, 1428],
                    [200006, 1428, 200008, 12194, 0, 13, 200007, 200006, 173781, 200005, 17196, 200008]])


def _peft_model(seed=0, attention=True):
    from peft import LoraConfig, get_peft_model

    model = build_random("tiny", seed=seed)
    config = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False,  # non-zero B so the LoRA terms matter
        target_modules=["q_proj", "v_proj"] if attention else [],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    return get_peft_model(model, config)


def _loss_and_grads(model):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


def _assert_close(a, b, rtol=1e-5):
    scale = b.abs().max().clamp_min(1e-12)
    assert (a - b).abs().max() <= rtol * scale, f"max diff {(a - b).abs().max()} vs scale {scale}"


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_peft_model_matches_stock(impl, monkeypatch):
    import ossforge.model.fused_moe as fm

    calls = []
    real = fm.moe_lora
    monkeypatch.setattr(fm, "moe_lora", lambda *a, **k: calls.append(k) or real(*a, **k))
    stock = _peft_model()
    stock.base_model.model.config._experts_implementation = impl
    fused = copy.deepcopy(stock)
    fuse_moe(fused, backend="torch")
    assert sum(isinstance(m, FusedGptOssMLP) for m in fused.modules()) == 2
    logits0, loss0, grads0 = _loss_and_grads(stock)
    logits1, loss1, grads1 = _loss_and_grads(fused)
    assert len(calls) == 2 and all(k["gate_up_lora"] is not None and k["down_lora"] for k in calls)
    _assert_close(logits1, logits0)
    _assert_close(loss1, loss0)
    assert grads0.keys() == grads1.keys()
    assert any("experts.lora_A" in n for n in grads1) and any("q_proj.lora_B" in n for n in grads1)
    for name in grads0:
        _assert_close(grads1[name], grads0[name])


def test_plain_model_full_finetune_grads_match():
    stock = build_random("tiny", seed=1)
    fused = fuse_moe(copy.deepcopy(stock))
    logits0, _, grads0 = _loss_and_grads(stock)
    logits1, _, grads1 = _loss_and_grads(fused)
    _assert_close(logits1, logits0)
    for name in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias", "router.weight"):
        key = f"model.layers.0.mlp.{'experts.' if 'proj' in name else ''}{name}"
        _assert_close(grads1[key], grads0[key])


def test_idempotent_and_unfuse():
    model = build_random("tiny", seed=2)
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    fuse_moe(fuse_moe(model))
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    assert all(type(m).__name__ != "GptOssMLP" for m in model.modules())
    unfuse_moe(model)
    assert not any(isinstance(m, FusedGptOssMLP) for m in model.modules())


def test_disable_adapter_and_save_identical(tmp_path):
    from safetensors.torch import load_file

    model = _peft_model(seed=3)
    model.save_pretrained(tmp_path / "stock")
    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(input_ids=IDS).logits
        lora_logits = model(input_ids=IDS).logits
    fuse_moe(model)
    model.save_pretrained(tmp_path / "fused")
    with torch.no_grad():
        with model.disable_adapter():
            _assert_close(model(input_ids=IDS).logits, base_logits)
        _assert_close(model(input_ids=IDS).logits, lora_logits)
    a = (tmp_path / "stock" / "adapter_model.safetensors").read_bytes()
    b = (tmp_path / "fused" / "adapter_model.safetensors").read_bytes()
    assert a == b
    assert (tmp_path / "stock" / "adapter_config.json").read_text() == (
        tmp_path / "fused" / "adapter_config.json").read_text()
    keys = load_file(tmp_path / "fused" / "adapter_model.safetensors").keys()
    assert any("mlp.experts.lora_A" in k for k in keys)


def test_bad_backend_rejected():
    with pytest.raises(ValueError):
        fuse_moe(build_random("tiny"), backend="cuda-magic")


def test_foreign_subclass_untouched_and_fused_experts_call():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    from ossforge.model.fused_moe import fused_experts_call

    class RoutedElsewhere(GptOssMLP):  # stands for a block another wrapper (e.g. EP) already switched
        pass

    model = _peft_model(seed=4, attention=False)
    mlps = [m for m in model.modules() if isinstance(m, GptOssMLP)]
    mlps[1].__class__ = RoutedElsewhere
    fuse_moe(model)
    assert type(mlps[0]) is FusedGptOssMLP and type(mlps[1]) is RoutedElsewhere
    rows = torch.randn(6, 64)
    _, weights, index = mlps[0].router(rows)
    call = fused_experts_call(mlps[0])
    _assert_close(call(rows, weights, index), mlps[0].experts(rows, index, weights))
    with model.disable_adapter():
        _assert_close(fused_experts_call(mlps[0])(rows, weights, index), mlps[0].experts(rows, index, weights))


def test_gradient_checkpointing_matches_stock():
    """The trainer checkpoints activations: the fused Function is re-run in backward and must agree."""
    stock = _peft_model(seed=7)
    fused = fuse_moe(copy.deepcopy(stock))
    for m in (stock, fused):
        m.train()
        m.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss0 = _loss_and_grads(stock)
    loss1 = _loss_and_grads(fused)
    _assert_close(loss1[1], loss0[1])
    for name in loss0[2]:
        _assert_close(loss1[2][name], loss0[2][name])
