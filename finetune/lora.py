"""peft LoRA for gpt-oss: attention projections as modules, MoE experts through ``target_parameters``.

The experts keep their weights as 3-D parameters (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``),
not ``nn.Linear`` modules, so peft adapts them with ``target_parameters`` (its ``ParamWrapper``). The
adapter files are therefore stock peft files: ``PeftModel.from_pretrained`` loads them on a stock
transformers ``GptOssForCausalLM``.

``lora.init_adapter`` warm-starts the LoRA factors from such an adapter folder (one made by stock peft,
or a previous run's ``adapter/``): its ``adapter_config.json`` must describe the same LoRA as the
``lora:`` section (:func:`check_init_adapter`), and its weights must cover every LoRA tensor of the
model (:func:`load_init_adapter`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ossforge.errors import UserError, where

EXPERTS = "mlp.experts"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
INIT_FIELD = "lora.init_adapter"


def expert_parameter_names(lora_cfg, num_layers: int) -> list[str]:
    """``target_parameters`` for peft: every expert target, in all layers or only ``expert_layers``."""
    if lora_cfg.expert_layers is None:
        return [f"{EXPERTS}.{name}" for name in lora_cfg.expert_targets]
    return [f"model.layers.{layer}.{EXPERTS}.{name}"
            for layer in sorted(set(lora_cfg.expert_layers)) for name in lora_cfg.expert_targets]


def peft_config(lora_cfg, num_layers: int):
    """The ``peft.LoraConfig`` of an ossforge ``lora:`` section."""
    from peft import LoraConfig

    targets = list(lora_cfg.targets)
    params = expert_parameter_names(lora_cfg, num_layers)
    if not targets and not params:
        raise UserError("lora.targets: nothing to adapt (lora.targets and lora.expert_targets are both empty)")
    cfg = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets or None,
        target_parameters=params or None,
        task_type="CAUSAL_LM",
    )
    return cfg


def apply_lora(model, lora_cfg, base_path: str | None = None, seed: int | None = None):
    """Wrap a ``GptOssForCausalLM`` in a peft model with ossforge's LoRA layout; only LoRA trains.

    With ``seed``, expert LoRA is drawn per global expert (:func:`seed_expert_lora`), so a model that
    holds only some experts gets exactly their share of the factors an all-experts model gets.
    """
    from peft import get_peft_model

    config = peft_config(lora_cfg, model.config.num_hidden_layers)
    if base_path is not None:  # peft records the model's name_or_path as the adapter's base
        model.name_or_path = model.config._name_or_path = base_path
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:  # peft names the target it could not find
        raise UserError(f"lora.targets: {exc}") from None
    if seed is not None:
        seed_expert_lora(peft_model, seed)
    return peft_model


def seed_expert_lora(model, seed: int) -> None:
    """Re-draw every expert's LoRA A from a seed of (``seed``, layer, parameter, global expert index).

    peft draws A for all of a layer's experts from the global RNG at once, so its values would depend
    on how many experts this rank holds; drawn per global expert (same distribution as peft's default
    ``kaiming_uniform_(a=sqrt(5))``), an expert starts from the same LoRA at any expert-parallel size.
    B stays zero.
    """
    import math

    import torch

    from ossforge.model.fused_moe import _unwrap_experts
    from ossforge.model.local_experts import expert_range_of

    for name, module in model.named_modules():
        if not (hasattr(module, "parameter_name") and hasattr(module, "lora_A")):
            continue
        base = _unwrap_experts(module)[0]
        start, _ = expert_range_of(base)
        layer = int(name.split("layers.")[1].split(".")[0])
        kind = ("gate_up_proj", "down_proj").index(module.parameter_name)
        for lora_a in module.lora_A.values():
            weight = lora_a.weight
            rows = weight.shape[0] // module.num_experts
            with torch.no_grad():
                for e in range(module.num_experts):
                    g = torch.Generator().manual_seed(((seed * 4_099 + layer) * 2 + kind) * 65_537 + start + e)
                    block = torch.empty(rows, weight.shape[1])
                    torch.nn.init.kaiming_uniform_(block, a=math.sqrt(5), generator=g)
                    weight[e * rows:(e + 1) * rows].copy_(block)


def _names(value) -> set[str] | str:
    """A saved ``target_modules`` / ``target_parameters`` as a set (peft writes lists, sets or None);
    a string (a regex or ``all-linear``) is returned as is."""
    if value is None:
        return set()
    return value if isinstance(value, str) else set(value)


def _show(names: set[str]) -> str:
    return "[" + ", ".join(sorted(names)) + "]"


def init_adapter_differences(lora_cfg, saved: dict) -> list[str]:
    """How an adapter's ``adapter_config.json`` (``saved``) differs from the LoRA this ``lora:`` section
    builds; empty when the adapter's weights can start this run's training."""
    want = peft_config(lora_cfg, 0)
    diffs = []
    if str(saved.get("peft_type", "")).upper() != "LORA":
        diffs.append(f"peft_type {saved.get('peft_type')} in the adapter, LORA needed")
    if saved.get("r") != want.r:
        diffs.append(f"r {saved.get('r')} in the adapter, {want.r} in lora.r")
    alpha = saved.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or float(alpha) != float(want.lora_alpha):
        shown = f"{alpha:g}" if isinstance(alpha, (int, float)) else alpha
        diffs.append(f"lora_alpha {shown} in the adapter, {want.lora_alpha:g} in lora.alpha")
    for key, ours in (("target_modules", "lora.targets"), ("target_parameters", "lora.expert_targets/expert_layers")):
        theirs, mine = _names(saved.get(key)), _names(getattr(want, key))
        if isinstance(theirs, str):
            diffs.append(f"{key} is the pattern {theirs!r} in the adapter; an explicit list is needed")
        elif theirs != mine:
            diffs.append(f"{key} {_show(theirs)} in the adapter, {_show(mine)} from {ours}")
    for key, meaning in (("use_rslora", "rsLoRA scaling"), ("use_dora", "DoRA"), ("lora_bias", "LoRA bias"),
                         ("rank_pattern", "per-module ranks"), ("alpha_pattern", "per-module alphas"),
                         ("layers_to_transform", "a layer subset"), ("modules_to_save", "fully trained modules")):
        if saved.get(key):
            diffs.append(f"{key} {saved[key]} in the adapter ({meaning}; ossforge trains plain LoRA)")
    return diffs


def check_init_adapter(lora_cfg, source=None) -> None:
    """UserError unless ``lora.init_adapter`` (when set) holds a config this ``lora:`` section matches."""
    if lora_cfg.init_adapter is None:
        return
    field, path = where(source, INIT_FIELD), Path(lora_cfg.init_adapter) / ADAPTER_CONFIG
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{field}: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(saved, dict):
        raise UserError(f"{field}: {path}: expected a JSON object")
    try:
        diffs = init_adapter_differences(lora_cfg, saved)
    except UserError as exc:  # an empty lora: section, named by peft_config
        raise UserError(f"{source}: {exc}" if source else str(exc)) from None
    if diffs:
        raise UserError(f"{field}: {'; '.join(diffs)} (adapter {path.parent})")


def load_init_adapter(model, lora_cfg, source=None) -> int:
    """Warm start: copy ``lora.init_adapter``'s LoRA factors into a model fresh from :func:`apply_lora`.

    Every LoRA tensor of the model must come from the file, and the file may hold nothing else.
    Returns how many tensors were loaded (0 when ``lora.init_adapter`` is not set).
    """
    if lora_cfg.init_adapter is None:
        return 0
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_init_adapter(lora_cfg, source)
    field = where(source, INIT_FIELD)
    path = Path(lora_cfg.init_adapter) / ADAPTER_WEIGHTS
    try:
        weights = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise UserError(f"{field}: cannot read {path}: {exc}") from None
    other = sorted(k for k in weights if "lora_" not in k)
    if other:
        raise UserError(f"{field}: {path} holds {len(other)} non-LoRA tensor(s), e.g. {other[0]} "
                        f"(only LoRA factors can start training)")
    try:
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError as exc:  # torch's size-mismatch report: a heading, then one line per tensor
        lines = str(exc).strip().splitlines()
        detail = lines[1 if len(lines) > 1 else 0].strip()
        raise UserError(f"{field}: {path} does not fit this model: {detail}") from None
    missing = sorted(k for k in result.missing_keys if "lora_" in k)
    if missing:
        raise UserError(f"{field}: {path} has no weights for {len(missing)} LoRA tensor(s) of this model, "
                        f"e.g. {missing[0]}")
    if result.unexpected_keys:
        unexpected = sorted(result.unexpected_keys)
        raise UserError(f"{field}: {path} holds {len(unexpected)} LoRA tensor(s) this model does not have, "
                        f"e.g. {unexpected[0]}")
    return len(weights)


@dataclass
class AdapterSummary:
    trainable: int
    total: int
    linear_modules: int  # adapted nn.Linear modules: attention projections, lm_head when targeted
    module_names: list[str]  # their distinct names, e.g. ["k_proj", "lm_head", "o_proj", ...]
    expert_layers: list[int]  # layers whose experts carry LoRA
    expert_params: list[str]  # which expert parameters are adapted

    def line(self) -> str:
        layers = ",".join(map(str, self.expert_layers)) or "none"
        return (f"{self.trainable:,} trainable of {self.total:,} ({100 * self.trainable / max(self.total, 1):.3f}%); "
                f"{self.linear_modules} linear modules ({', '.join(self.module_names) or 'none'}), experts in layers [{layers}] "
                f"({', '.join(self.expert_params) or 'none'})")


def summarize(model) -> AdapterSummary:
    """What a peft-wrapped gpt-oss model trains (for the pre-training summary)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    attention, names, layers, params = 0, set(), set(), set()
    for name, module in model.named_modules():
        if hasattr(module, "parameter_name") and hasattr(module, "lora_A"):  # peft ParamWrapper
            parts = name.split(".")
            if "layers" in parts:
                layers.add(int(parts[parts.index("layers") + 1]))
            params.add(module.parameter_name)
        elif hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            attention += 1
            names.add(name.rsplit(".", 1)[-1])
    return AdapterSummary(trainable, total, attention, sorted(names), sorted(layers), sorted(params))
