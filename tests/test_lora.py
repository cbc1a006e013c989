"""peft LoRA on gpt-oss: attention modules plus expert parameters, in stock peft's format."""

from __future__ import annotations

import pytest
import torch

from ossforge.errors import UserError
from ossforge.finetune.config import LoraConfig
from ossforge.finetune.lora import apply_lora, expert_parameter_names, summarize


def _lora_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_attention_and_all_expert_layers(tiny_model):
    model = apply_lora(tiny_model, LoraConfig(r=4, alpha=8))
    names = _lora_names(model)
    for layer in range(tiny_model.config.num_hidden_layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert f"base_model.model.model.layers.{layer}.self_attn.{proj}.lora_A.default.weight" in names
        # peft nests one ParamWrapper per expert parameter: gate_up_proj inside, down_proj outside
        assert f"base_model.model.model.layers.{layer}.mlp.experts.base_layer.lora_A.default.weight" in names
        assert f"base_model.model.model.layers.{layer}.mlp.experts.lora_B.default.weight" in names
    assert all("lora_" in n for n in names), "only LoRA factors train"
    s = summarize(model)
    assert s.linear_modules == 4 * tiny_model.config.num_hidden_layers
    assert s.expert_layers == [0, 1] and s.expert_params == ["down_proj", "gate_up_proj"]
    E, r = tiny_model.config.num_local_experts, 4
    a = dict(model.named_parameters())["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.default.weight"]
    assert a.shape == (E * r, tiny_model.config.hidden_size)  # one rank-r factor per expert


def test_expert_layers_subset(tiny_model):
    cfg = LoraConfig(r=2, alpha=4, targets=["q_proj"], expert_targets=["down_proj"], expert_layers=[1])
    assert expert_parameter_names(cfg, 2) == ["model.layers.1.mlp.experts.down_proj"]
    model = apply_lora(tiny_model, cfg)
    names = _lora_names(model)
    assert not any("layers.0.mlp" in n for n in names)
    assert any("layers.1.mlp.experts.lora_A" in n for n in names)
    assert not any("k_proj" in n for n in names)
    assert summarize(model).expert_layers == [1]


def test_nothing_to_adapt_is_a_user_error(tiny_model):
    with pytest.raises(UserError, match="lora.targets"):
        apply_lora(tiny_model, LoraConfig(targets=[], expert_targets=[]))


def test_lora_starts_as_identity_and_then_changes_outputs(tiny_model):
    ids = torch.tensor([[200006, 1428, 200008, 13225, 200007]])
    before = tiny_model(input_ids=ids).logits.detach()
    model = apply_lora(tiny_model, LoraConfig(r=4, alpha=8))
    torch.testing.assert_close(model(input_ids=ids).logits, before)  # lora_B starts at zero
    for n, p in model.named_parameters():
        if "experts" in n and "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    assert not torch.allclose(model(input_ids=ids).logits, before, atol=1e-4), "expert LoRA reaches the output"
