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


# Presets up to this many parameters are built whole from the seed (as in earlier releases, so CPU runs
# stay reproducible) and then cut to the local experts; larger ones are built on the meta device and
# initialise only the local experts, each seeded by its global index.
WHOLE_BUILD_MAX_PARAMS = 1 << 28


def preset_params(preset: str) -> int:
    """Parameter count of a preset, from its shapes alone."""
    from ossforge.model.local_experts import meta_model

    return sum(p.numel() for p in meta_model(make_config(preset)).parameters())


def build_random(preset: str, seed: int = 0, dtype=None, device="cpu", expert_range=None, **overrides):
    """A randomly initialised ``GptOssForCausalLM`` of a preset, reproducible from ``seed``.

    ``expert_range = (start, stop)`` keeps only those global experts (an expert-parallel rank's share);
    the weights do not depend on it: every rank, at any EP size, holds the same values for an expert.
    """
    import torch
    from transformers import GptOssForCausalLM

    from ossforge.model.local_experts import keep_local_experts, meta_model

    config = make_config(preset, **overrides)
    skeleton = meta_model(config)
    if sum(p.numel() for p in skeleton.parameters()) <= WHOLE_BUILD_MAX_PARAMS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = GptOssForCausalLM(config)
        if expert_range is not None:
            keep_local_experts(model, expert_range)
        if dtype is not None:
            model = model.to(dtype)
        return model.to(device)
    init_random(skeleton, seed, dtype or torch.float32, device, expert_range)
    return skeleton


def expert_seed(seed: int, layer: int, expert: int) -> int:
    """Seed of one expert's random init: a function of its global index only."""
    return (seed * 1_000_003 + layer) * 65_537 + expert


def init_random(model, seed: int, dtype, device, expert_range=None) -> None:
    """Materialise a meta-device model on ``device``: dense modules initialised as transformers does
    (one module at a time, seeded in module order), experts only for ``expert_range``, each seeded by
    :func:`expert_seed`, so no full-size expert tensor is ever created."""
    from ossforge.model.local_experts import check_materialised, rebuild_rotary

    for _ in init_modules(model, seed, dtype, device, expert_range):
        pass
    rebuild_rotary(model, device)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    check_materialised(model, device)
    model.config.dtype = dtype


def init_modules(model, seed: int, dtype, device, expert_range=None):
    """Initialise a meta-device model module by module, yielding each ``(name, module)`` once its own
    tensors are set, so a caller can write and release them as it goes (see ``write_random_folder``)."""
    import torch

    from ossforge.model.local_experts import assign

    config = model.config
    total = config.num_local_experts
    start, stop = expert_range or (0, total)
    std = config.initializer_range
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name, module in model.named_modules():
            if type(module).__name__ == "GptOssExperts":
                layer = int(name.split("layers.")[1].split(".")[0])
                _init_local_experts(module, layer, seed, (start, stop), total, std, dtype, device)
                yield name, module
                continue
            own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
            if not own:
                continue
            for attr, tensor in own:
                assign(module, attr, torch.empty(tensor.shape, dtype=dtype if tensor.is_floating_point() else tensor.dtype,
                                                 device=device))
            model._init_weights(module)
            yield name, module


def write_random_folder(preset: str, seed: int, dtype, folder) -> None:
    """Write a preset's random weights (exactly ``build_random``'s) as an HF folder, holding one module
    at a time plus one safetensors shard: how a base too large to keep is rebuilt for merge and eval."""
    import json
    from pathlib import Path

    import torch

    from ossforge.model.checkpoint import CONFIG, write_safetensors
    from ossforge.model.local_experts import meta_model

    config = make_config(preset)
    if sum(p.numel() for p in meta_model(config).parameters()) <= WHOLE_BUILD_MAX_PARAMS:
        from ossforge.model.checkpoint import save_base

        save_base(build_random(preset, seed=seed, dtype=dtype), folder)
        return
    model = meta_model(config)
    persistent = set(model.state_dict(keep_vars=True))

    def tensors():
        for name, module in init_modules(model, seed, dtype, "cpu"):
            for attr, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                full = f"{name}.{attr}" if name else attr
                if full in persistent:
                    yield full, tensor.detach()
            module.to_empty(device="meta", recurse=False)  # written: release it

    from ossforge.atomic import directory

    with directory(Path(folder)) as tmp:
        write_safetensors(tensors(), tmp)
        data = config.to_dict()
        data.update(architectures=["GptOssForCausalLM"], dtype=str(dtype).removeprefix("torch."))
        (Path(tmp) / CONFIG).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _init_local_experts(experts, layer, seed, expert_range, total, std, dtype, device) -> None:
    import torch

    from ossforge.model.local_experts import assign, set_expert_range

    start, stop = expert_range
    weights = {attr: torch.zeros((stop - start,) + tuple(getattr(experts, attr).shape[1:]), dtype=dtype, device=device)
               for attr in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")}
    for e in range(start, stop) if torch.device(device).type != "meta" else ():
        g = torch.Generator(device=device).manual_seed(expert_seed(seed, layer, e))
        for attr in ("gate_up_proj", "down_proj"):  # biases stay zero, as transformers initialises them
            weights[attr][e - start].normal_(0.0, std, generator=g)
    for attr, tensor in weights.items():
        assign(experts, attr, tensor)
    set_expert_range(experts, (start, stop), total)
