"""peft LoRA for gpt-oss: attention projections as modules, MoE experts through ``target_parameters``.

The experts keep their weights as 3-D parameters (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``),
not ``nn.Linear`` modules, so peft adapts them with ``target_parameters`` (its ``ParamWrapper``). The
adapter files are therefore stock peft files: ``PeftModel.from_pretrained`` loads them on a stock
transformers ``GptOssForCausalLM``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ossforge.errors import UserError

EXPERTS = "mlp.experts"


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


def apply_lora(model, lora_cfg, base_path: str | None = None):
    """Wrap a ``GptOssForCausalLM`` in a peft model with ossforge's LoRA layout; only LoRA trains."""
    from peft import get_peft_model

    config = peft_config(lora_cfg, model.config.num_hidden_layers)
    if base_path is not None:  # peft records the model's name_or_path as the adapter's base
        model.name_or_path = model.config._name_or_path = base_path
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # peft names the target it could not find
        raise UserError(f"lora.targets: {exc}") from None


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
