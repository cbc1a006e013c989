"""Will vLLM load this ossforge adapter unmerged? (``vllm serve BASE --enable-lora --lora-modules med=DIR``)

The check reads only ``adapter_config.json`` and the safetensors header (no weights, no GPU), and
states what vLLM's gpt-oss LoRA loader expects. Read from vLLM's source (vllm-project/vllm, main
branch as stored in 2026; gpt-oss expert LoRA arrived in vLLM 0.11.2):

- ``vllm/model_executor/models/gpt_oss.py`` (commit a6b6cfaa): ``GptOssForCausalLM`` declares
  ``is_3d_moe_weight = True`` (expert LoRA in peft's 3-D ``target_parameters`` layout, not per-expert
  ``experts.{e}.gate_proj``), ``packed_modules_mapping = {"qkv_proj": [q_proj, k_proj, v_proj]}``
  and maps ``.self_attn.`` to ``.attn.``; the router is a plain ``torch.nn.Linear``, not a vLLM
  LoRA-capable layer, so LoRA on it is not served.
- ``vllm/lora/lora_model.py`` (commit 0306474e) ``from_local_checkpoint``: reads
  ``adapter_model.safetensors``; a key's module (``parse_fine_tuned_lora_name``: ``base_model.model.``
  stripped, ``lora_A.weight`` / ``lora_B.weight`` cut) must end in an expected module, ``experts``
  for the MoE; ``...experts.base_layer.*`` keys are accepted as the fused gate_up LoRA; DoRA is refused.
- ``vllm/lora/model_manager.py`` (commit 01533aa8) ``create_dummy_lora`` for ``FusedMoE3DWithLoRA``:
  ``mlp.experts`` holds w2 (down_proj: in = intermediate, out = hidden) and ``mlp.experts.base_layer``
  holds w13 (gate_up_proj: in = hidden, out = 2 x intermediate), each of rank ``r x num_experts``.

So an adapter made by stock peft from ``target_parameters=[mlp.experts.gate_up_proj,
mlp.experts.down_proj]`` matches: peft nests the wrappers with gate_up_proj inside (``base_layer``).
An adapter with only ``gate_up_proj`` does not: its single wrapper sits where vLLM reads down_proj.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

VLLM_ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn\.(\w+)|mlp\.experts(\.base_layer)?)"
                  r"\.lora_([AB])\.weight$")


def vllm_adapter_problems(adapter_dir: str | Path, model_config) -> list[str]:
    """Why vLLM's gpt-oss LoRA loader would refuse (or misread) the adapter folder; empty when it
    matches. ``model_config``: the base's ``GptOssConfig``. Reads the safetensors header only."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    cfg_path, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        return [f"{adapter_dir}: needs adapter_config.json and adapter_model.safetensors (vLLM reads those)"]
    with safe_open(str(weights), framework="pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    return vllm_layout_problems(json.loads(cfg_path.read_text()), shapes, model_config)


def vllm_layout_problems(cfg: dict, shapes: dict[str, tuple[int, ...]], model_config) -> list[str]:
    """:func:`vllm_adapter_problems` on an adapter config dict and ``{tensor name: shape}``."""
    problems: list[str] = []
    if cfg.get("peft_type") != "LORA":
        problems.append(f"adapter_config.json: peft_type {cfg.get('peft_type')!r}, vLLM serves LORA")
    if cfg.get("use_dora"):
        problems.append("adapter_config.json: use_dora, which vLLM does not load")
    if cfg.get("bias", "none") != "none":
        problems.append(f"adapter_config.json: bias {cfg.get('bias')!r}; vLLM expects 'none'")
    if cfg.get("modules_to_save"):
        problems.append(f"adapter_config.json: modules_to_save {cfg['modules_to_save']}; vLLM loads only LoRA factors")
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    for t in targets:
        if t not in VLLM_ATTENTION_MODULES:
            problems.append(f"adapter_config.json: target_modules {t!r} is not LoRA-capable in vLLM's gpt-oss "
                            f"(supported: {', '.join(VLLM_ATTENTION_MODULES)} and the experts)")
    for p in cfg.get("target_parameters") or []:
        if p.rsplit(".", 1)[-1] not in ("gate_up_proj", "down_proj") or "mlp.experts." not in p:
            problems.append(f"adapter_config.json: target_parameters {p!r}: vLLM serves only "
                            "mlp.experts.gate_up_proj and mlp.experts.down_proj")
    r = int(cfg.get("r", 0))
    hidden, inter, experts = model_config.hidden_size, model_config.intermediate_size, model_config.num_local_experts
    expected = {  # (where, factor) -> shape
        ("experts", "A"): (r * experts, inter), ("experts", "B"): (hidden, r * experts),
        ("base_layer", "A"): (r * experts, hidden), ("base_layer", "B"): (2 * inter, r * experts),
    }
    name = "adapter_model.safetensors"
    expert_keys: dict[int, set[str]] = {}
    for key, shape in shapes.items():
        m = _KEY.match(key)
        if m is None:
            problems.append(f"{name}: tensor {key!r} is not a name vLLM's gpt-oss loader maps")
            continue
        layer, module, factor = int(m.group(1)), m.group(3), m.group(5)
        if layer >= model_config.num_hidden_layers:
            problems.append(f"{name}: {key!r}: layer {layer} >= {model_config.num_hidden_layers}")
        if module is not None:
            if module not in VLLM_ATTENTION_MODULES:
                problems.append(f"{name}: {key!r}: self_attn.{module} is not LoRA-capable in vLLM")
            continue
        where = "base_layer" if m.group(4) else "experts"
        expert_keys.setdefault(layer, set()).add(f"{where}.{factor}")
        want = expected[(where, factor)]
        if tuple(shape) != want:
            role = "gate_up_proj (w13)" if where == "base_layer" else "down_proj (w2)"
            problems.append(f"{name}: {key!r} has shape {list(shape)}, vLLM reads it as {role} of shape {list(want)}")
    for layer, found in sorted(expert_keys.items()):
        missing = {"experts.A", "experts.B", "base_layer.A", "base_layer.B"} - found
        if missing:
            problems.append(f"{name}: layer {layer}: expert LoRA must cover both gate_up_proj and "
                            f"down_proj (missing {', '.join(sorted(missing))})")
    return problems
