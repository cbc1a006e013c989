"""gpt-oss architectures by name.

``gpt-oss-20b`` and ``gpt-oss-120b`` match the published configs; the ``tiny*`` presets keep the
architecture (sinks, alternating sliding/full attention, YaRN, top-k routing, clamped SwiGLU, real
vocab) at a size a CPU trains in minutes.
"""

from __future__ import annotations

from typing import Any

VOCAB_SIZE = 201088


def _layer_types(n: int) -> list[str]:
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]


def _arch(layers: int, experts: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
          head_dim: int, window: int, top_k: int = 4) -> dict[str, Any]:
    return dict(
        num_hidden_layers=layers,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        sliding_window=window,
        layer_types=_layer_types(layers),
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "original_max_position_embeddings": 4096,
            "truncate": False,
        },
        attention_bias=True,
        swiglu_limit=7.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        eos_token_id=200002,
        pad_token_id=199999,
        router_aux_loss_coef=0.9,
    )


PRESETS: dict[str, dict[str, Any]] = {
    "gpt-oss-20b": _arch(24, 32, 2880, 2880, 64, 8, 64, 128),
    "gpt-oss-120b": _arch(36, 128, 2880, 2880, 64, 8, 64, 128),
    # CPU presets: same architecture, small widths, real vocabulary.
    "tiny": _arch(2, 8, 64, 64, 4, 2, 16, 32),
    # Random init at std 0.1 (not 0.02): with hidden 128 behind a frozen final norm, the LM head can
    # then reach logits peaked enough for a 201k vocabulary, so LoRA alone can fit the data.
    "tiny-quickstart": {**_arch(2, 8, 128, 128, 4, 2, 32, 64), "initializer_range": 0.1},
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def make_config(preset: str, **overrides):
    """``GptOssConfig`` for a preset name (KeyError names the choices)."""
    from transformers import GptOssConfig

    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r} (choose from {', '.join(preset_names())})")
    kwargs = dict(PRESETS[preset])
    kwargs.update(overrides)
    return GptOssConfig(**kwargs)


def build_random(preset: str, seed: int = 0, dtype=None, **overrides):
    """A randomly initialised ``GptOssForCausalLM`` of a preset, reproducible from ``seed``."""
    import torch
    from transformers import GptOssForCausalLM

    config = make_config(preset, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GptOssForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    return model
