"""Presets match the published gpt-oss configs; sizes computed on the meta device (nothing allocated)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GptOssConfig, GptOssForCausalLM

from ossforge.model.presets import PRESETS, VOCAB_SIZE, build_random, make_config

# config.json of openai/gpt-oss-20b as published on the Hub (transformers 4.55 format:
# rope_scaling + rope_theta, quantization_config for the MXFP4 experts).
PUBLISHED_20B = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"],
        "quant_method": "mxfp4",
    },
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                     "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "transformers_version": "4.55.0.dev0",
    "use_cache": True,
    "vocab_size": 201088,
}


def _published_120b() -> dict:
    # gpt-oss-120b's config.json differs from the 20b's only in depth and expert count.
    cfg = copy.deepcopy(PUBLISHED_20B)
    cfg.update(num_hidden_layers=36, num_local_experts=128, layer_types=["sliding_attention", "full_attention"] * 18)
    return cfg


ARCH_FIELDS = (
    "num_hidden_layers", "num_local_experts", "num_experts_per_tok", "hidden_size", "intermediate_size",
    "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window", "layer_types", "vocab_size",
    "max_position_embeddings", "rope_parameters", "attention_bias", "swiglu_limit", "swiglu_alpha",
    "rms_norm_eps", "tie_word_embeddings", "eos_token_id", "pad_token_id", "router_aux_loss_coef",
    "hidden_act",
)


@pytest.mark.parametrize("preset, published", [("gpt-oss-20b", PUBLISHED_20B), ("gpt-oss-120b", _published_120b())])
def test_preset_equals_published_config(preset, published):
    ours = make_config(preset)
    theirs = GptOssConfig.from_dict(dict(published))
    for field in ARCH_FIELDS:
        assert getattr(ours, field) == getattr(theirs, field), field


@pytest.mark.parametrize("preset, layers, experts", [("gpt-oss-20b", 24, 32), ("gpt-oss-120b", 36, 128)])
def test_exact_architecture(preset, layers, experts):
    cfg = make_config(preset)
    assert (cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok) == (layers, experts, 4)
    assert (cfg.hidden_size, cfg.intermediate_size) == (2880, 2880)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (64, 8, 64)
    assert cfg.sliding_window == 128
    assert cfg.layer_types == ["sliding_attention", "full_attention"] * (layers // 2)
    rope = cfg.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 32.0 and rope["rope_theta"] == 150000
    assert (rope["beta_fast"], rope["beta_slow"], rope["original_max_position_embeddings"]) == (32.0, 1.0, 4096)
    assert cfg.vocab_size == VOCAB_SIZE == 201088
    assert (cfg.eos_token_id, cfg.pad_token_id) == (200002, 199999)


def _meta_model(preset):
    with torch.device("meta"):
        return GptOssForCausalLM(make_config(preset))


@pytest.mark.parametrize("preset, total_b, active_b", [("gpt-oss-20b", 20.9, 3.6), ("gpt-oss-120b", 116.8, 5.1)])
def test_parameter_counts(preset, total_b, active_b):
    """Published sizes: 20b has 20.9B total / 3.6B active, 120b 116.8B / 5.1B (model card)."""
    model = _meta_model(preset)
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    # Active: every non-expert weight plus top-k of E experts; the model card does not count the unembedding.
    active = total - experts + experts * cfg.num_experts_per_tok // cfg.num_local_experts
    active -= model.lm_head.weight.numel()
    assert total / 1e9 == pytest.approx(total_b, abs=0.1)
    assert active / 1e9 == pytest.approx(active_b, abs=0.1)
    assert all(p.is_meta for p in model.parameters())  # nothing was allocated


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.startswith("tiny")])
def test_tiny_presets_keep_the_architecture(preset):
    model = _meta_model(preset)
    cfg = model.config
    assert cfg.vocab_size == VOCAB_SIZE
    assert set(cfg.layer_types) == {"sliding_attention", "full_attention"}
    assert cfg.rope_parameters["rope_type"] == "yarn"
    attn = model.model.layers[0].self_attn
    assert attn.sinks.shape == (cfg.num_attention_heads,)
    assert attn.q_proj.bias is not None  # attention_bias
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (cfg.num_local_experts, cfg.hidden_size, 2 * cfg.intermediate_size)
    assert experts.down_proj.shape == (cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size)
    assert cfg.num_experts_per_tok == 4 < cfg.num_local_experts
    # MXFP4 export needs both expert dims in whole blocks of 32.
    assert cfg.hidden_size % 32 == 0 and cfg.intermediate_size % 32 == 0


def test_build_random_is_seeded():
    a = build_random("tiny", seed=3)
    b = build_random("tiny", seed=3)
    c = build_random("tiny", seed=4)
    pa, pb, pc = (m.model.layers[0].mlp.experts.gate_up_proj for m in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)


def test_unknown_preset_names_the_choices():
    with pytest.raises(KeyError, match="gpt-oss-20b"):
        make_config("gpt-oss-7b")
