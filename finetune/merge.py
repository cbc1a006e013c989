"""Merge a LoRA adapter (attention + expert LoRA) into its base and write an HF checkpoint.

The output loads with stock ``GptOssForCausalLM.from_pretrained(OUT)``. The base is, in order:
``--base DIR``; the adapter's ``base_model_name_or_path`` when that is a local folder; the
``base/`` folder the trainer writes beside ``adapter/`` for random-initialised presets.

The merge streams: the base is read one safetensors shard at a time, each tensor a LoRA targets gets
peft's own delta (``get_delta_weight`` of the ``LoraLayer`` / expert ``ParamWrapper``, on a meta-device
copy of the model holding only the adapter's real weights) added in fp32, and the merged shard is written
before the next one is read. Host peak is a few shards plus the adapter whatever the model size: the
shard's mapped file pages, its merged tensors and their serialised bytes (measured in tests/test_merge.py:
+121 MiB over the process baseline for 38 MiB shards of a 316 MiB model). When the base fits ``PROBE_MAX_BYTES``, the logits of a short
probe through base + adapter (peft) and through the merged folder are compared and printed.

``--mxfp4`` writes the experts in the published MXFP4 format and measures how much of the adapter
survives the re-quantisation: over the expert tensors, ``|W_mxfp4 - W_base| / |W_merged - W_base|``
(Frobenius norms) and the part of the delta that survives along its own direction
``<W_mxfp4 - W_base, dW> / |dW|^2``, and on the probe the logit shift retained,
``|logits_mxfp4 - logits_base| / |logits_adapter - logits_base|``. LoRA deltas smaller than half an FP4
grid step round back to the base, so below ``MIN_RETAINED`` (90%) it warns: keep the experts in bf16
(no ``--mxfp4``) or serve the adapter unmerged (vLLM ``--enable-lora``).

examples:
  ossforge merge --adapter runs/quickstart/adapter --out runs/quickstart/merged
  ossforge merge --adapter runs/med-20b/adapter --base ~/models/gpt-oss-20b --out merged-20b --dtype bf16 --mxfp4
"""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from pathlib import Path

from ossforge.errors import UserError

SINGLE = "model.safetensors"

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
PROBE_TEXT = "What is the paediatric paracetamol dose for a 20 kg child?"
INFO_FILE = "ossforge_merge.json"
PROBE_MAX_BYTES = 8 * 1024**3  # the probe loads the whole model (three times, one after the other)
MIN_RETAINED = 0.9


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, metavar="DIR",
                   help="peft adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, metavar="DIR", help="new folder for the merged HF checkpoint")
    p.add_argument("--base", default=None, metavar="DIR",
                   help="base model folder (default: adapter's base_model_name_or_path, else ADAPTER/../base)")
    p.add_argument("--mxfp4", action="store_true",
                   help="store expert weights in the published MXFP4 format and report the logit error it adds")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="precision of the merged weights (auto: as the base folder stores them)")
    p.add_argument("--no-probe", action="store_true",
                   help="skip the logit probe (it loads the whole model; skipped anyway above 8 GiB of weights)")


def run(args: argparse.Namespace) -> int:
    adapter = Path(args.adapter).expanduser()
    adapter_config = read_adapter_config(adapter)
    base = find_base(adapter, adapter_config, args.base)
    out = Path(args.out).expanduser()
    _check_out(out, adapter, base)

    import torch  # after the checks: a mistyped path fails in a blink

    from ossforge.model.checkpoint import atomic_dir, read_config, stored_dtype, weight_files
    from ossforge.model.mxfp4 import GROUP

    if args.mxfp4:
        config = read_config(base)
        if config.hidden_size % GROUP or config.intermediate_size % GROUP:
            raise UserError(f"{base / 'config.json'}: --mxfp4 needs hidden_size and intermediate_size to be "
                            f"multiples of {GROUP}, got {config.hidden_size} and {config.intermediate_size}")
    dtype = stored_dtype(base) if args.dtype == "auto" else {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if dtype not in (torch.float32, torch.bfloat16):
        dtype = torch.float32

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the few printed lines below are the report
    print(f"base:    {base}")
    print(f"adapter: {adapter}")
    peft_model = apply_adapter(_meta_model(base), adapter, meta=True)
    info = {"base": str(base), "adapter": str(adapter), "dtype": str(dtype).removeprefix("torch."),
            "mxfp4": bool(args.mxfp4)}
    with atomic_dir(out) as tmp:
        stats = stream_merge(peft_model, base, tmp, dtype, mxfp4=args.mxfp4)
        print(f"merged {stats['merged_tensors']} tensors in {stats['shards']} shard(s), one at a time")
        if args.mxfp4:
            info["mxfp4_retained"] = {k: stats[k] for k in ("weight_retained", "weight_retained_along_delta",
                                                             "weight_error_vs_delta")}
        else:
            info.pop("mxfp4_retained", None)
        probe_bytes = sum(f.stat().st_size for f in set(weight_files(base).values()))
        if not args.no_probe and probe_bytes <= PROBE_MAX_BYTES:
            probed = _probe(base, adapter, tmp, dtype, args.mxfp4)
            info.setdefault("mxfp4_retained", {}).update(probed.pop("mxfp4_retained", {}))
            info.update(probed)
        _finish(tmp, base, info)
    if args.mxfp4:
        _report_retention(info)
    print(f"wrote {out}")
    return 0


def _meta_model(base: Path):
    """The base architecture on the meta device: names and shapes, no weights."""
    import torch
    from transformers import GptOssForCausalLM

    from ossforge.model.checkpoint import read_config

    with torch.device("meta"):
        model = GptOssForCausalLM(read_config(base))
    model.name_or_path = str(base)
    return model


def lora_targets(peft_model) -> dict[str, list]:
    """Base tensor name (as stored in the folder) -> the peft LoRA layers whose delta it receives."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    targets: dict[str, list] = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        prefix = name.removeprefix("base_model.model.").replace(".base_layer", "")
        param = module.parameter_name if isinstance(module, ParamWrapper) else "weight"
        targets.setdefault(f"{prefix}.{param}", []).append(module)
    return targets


def _delta(module, weight):
    """peft's delta for ``module`` in fp32; a ParamWrapper sees the real base tensor while computing it."""
    import torch
    from peft.tuners.lora.layer import ParamWrapper

    if not isinstance(module, ParamWrapper):
        return module.get_delta_weight("default").float()
    holder = module.get_base_layer()
    meta = holder._parameters[module.parameter_name]
    holder._parameters[module.parameter_name] = torch.nn.Parameter(weight, requires_grad=False)
    try:
        return module.get_delta_weight("default").float()
    finally:
        holder._parameters[module.parameter_name] = meta


def stream_merge(peft_model, base: Path, out: Path, dtype, *, mxfp4: bool = False) -> dict:
    """Merge shard by shard into ``out`` (safetensors shards + index + config.json); returns statistics.

    Each base shard is opened, its tensors merged in fp32 and cast to ``dtype`` (expert tensors
    quantised to MXFP4 with ``mxfp4``), written as one output shard and released before the next.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ossforge.model.checkpoint import (CONFIG, EXPERT_WEIGHTS, INDEX, MXFP4_NOT_CONVERTED, read_config,
                                           weight_files)
    from ossforge.model.mxfp4 import dequantize_mxfp4, quantize_mxfp4

    files = weight_files(base)
    targets = lora_targets(peft_model)
    missing = sorted(set(targets) - {n.removesuffix("_blocks") for n in files})
    if missing:
        raise UserError(f"{base}: adapter targets tensors the base folder does not store: {missing[:3]}")
    shards = sorted(set(files.values()))
    weight_map, total = {}, 0
    stats = {"merged_tensors": 0, "shards": len(shards)}
    sq_quant = sq_delta = dot = sq_error = 0.0
    for i, shard in enumerate(shards):
        merged_shard = {}
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if name.endswith(("_blocks", "_scales")):  # a published MXFP4 expert: dequantise it
                    if name.endswith("_scales"):
                        continue
                    stem = name.removesuffix("_blocks")
                    with safe_open(str(files[f"{stem}_scales"]), framework="pt", device="cpu") as g:
                        tensor = dequantize_mxfp4(tensor, g.get_tensor(f"{stem}_scales"), torch.float32)
                    name = stem
                weight = tensor.float() if tensor.is_floating_point() else tensor
                merged = weight
                if name in targets:
                    delta = sum(_delta(m, weight) for m in targets[name])
                    merged = weight + delta
                    stats["merged_tensors"] += 1
                if mxfp4 and name.endswith(EXPERT_WEIGHTS):
                    blocks, scales = quantize_mxfp4(merged)
                    merged_shard[f"{name}_blocks"], merged_shard[f"{name}_scales"] = blocks, scales
                    if name in targets:  # how much of the delta the FP4 grid keeps
                        kept = dequantize_mxfp4(blocks, scales, torch.float32) - weight
                        sq_quant += float(kept.square().sum())
                        sq_delta += float(delta.square().sum())
                        dot += float((kept * delta).sum())
                        sq_error += float((kept - delta).square().sum())
                else:
                    merged_shard[name] = merged.to(dtype) if merged.is_floating_point() else merged
                del tensor, weight, merged
        out_name = SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in merged_shard.items()}, str(out / out_name), metadata={"format": "pt"})
        for name, tensor in merged_shard.items():
            weight_map[name] = out_name
            total += tensor.numel() * tensor.element_size()
        del merged_shard
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config = read_config(base).to_dict()
    config["architectures"] = ["GptOssForCausalLM"]
    config["dtype"] = str(dtype).removeprefix("torch.")
    if mxfp4:
        config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": MXFP4_NOT_CONVERTED}
        stats["weight_retained"] = (sq_quant / sq_delta) ** 0.5 if sq_delta else None
        stats["weight_retained_along_delta"] = dot / sq_delta if sq_delta else None
        stats["weight_error_vs_delta"] = (sq_error / sq_delta) ** 0.5 if sq_delta else None
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return stats


def _probe(base: Path, adapter: Path, merged_dir: Path, dtype, mxfp4: bool) -> dict:
    """Logits of a short prompt: base + adapter (peft) against the merged folder (and the base alone)."""
    import torch

    from ossforge.model.checkpoint import load_folder

    model = load_folder(base, dtype=dtype)
    probe = probe_ids(model.config.vocab_size)
    base_logits = _logits(model, probe) if mxfp4 else None
    adapter_logits = _logits(apply_adapter(model, adapter), probe)
    del model
    merged_logits = _logits(load_folder(merged_dir, dtype=dtype), probe)
    info = {}
    if mxfp4:
        err = logit_error(merged_logits, adapter_logits)
        info["mxfp4_logit_error"] = err
        print(f"mxfp4 logit error vs adapter model (probe of {probe.shape[1]} tokens): max |dlogit| "
              f"{err['max_abs']:.3e}, mean {err['mean_abs']:.3e}, rel {err['rel']:.3e}")
        shift = (adapter_logits - base_logits).norm().item()
        info["mxfp4_retained"] = {"logit_shift_retained": (merged_logits - base_logits).norm().item() / shift
                                  if shift else None}
        return info
    err = logit_error(merged_logits, adapter_logits)
    print(f"merge check (probe of {probe.shape[1]} tokens): max |dlogit| {err['max_abs']:.3e}, "
          f"mean {err['mean_abs']:.3e}, rel {err['rel']:.3e}")
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    if not err["rel"] <= tolerance:
        print(f"warning: merged logits differ from the adapter model's by rel {err['rel']:.3e} "
              f"(> {tolerance:g})", flush=True)
    return {"merge_logit_error": err}


def _report_retention(info: dict) -> None:
    """Print how much of the adapter survives MXFP4, and warn below MIN_RETAINED.

    Warns when less than 90% of the delta survives along its direction or in the probe's logit shift,
    or when re-quantising moves the experts further from the merged weights than the adapter moved
    them from the base (a block whose largest value grows past 6 x its scale gets the next scale up,
    and all of its 32 values are re-rounded on the coarser grid).
    """
    kept = info.get("mxfp4_retained") or {}
    labels = (("weight_retained", "expert weights |W_mxfp4-W_base|/|W_merged-W_base|"),
              ("weight_retained_along_delta", "along the delta"),
              ("logit_shift_retained", "probe logit shift"))
    parts = [f"{label} {100 * kept[key]:.1f}%" for key, label in labels if kept.get(key) is not None]
    if not parts:
        print("mxfp4: the adapter changes no expert tensor; nothing to retain")
        return
    error = kept.get("weight_error_vs_delta")
    print("mxfp4 retained: " + ", ".join(parts)
          + (f"; re-quantisation error {100 * error:.1f}% of the delta" if error is not None else ""))
    survived = [kept[k] for k in ("weight_retained_along_delta", "logit_shift_retained") if kept.get(k) is not None]
    worst = min(survived) if survived else 1.0
    if worst < MIN_RETAINED or (error is not None and error > 1.0):
        what = (f"only {100 * worst:.0f}% of the adapter's effect survives MXFP4 re-quantisation"
                if worst < MIN_RETAINED else
                f"MXFP4 re-quantisation changes the experts {error:.1f}x as much as the adapter does")
        print(f"warning: {what} (deltas below half an FP4 step round back to the base; a block whose largest "
              f"value grows past 6x its scale is re-rounded on a grid twice as coarse); keep bf16 experts "
              f"(merge without --mxfp4) or serve the adapter unmerged (vLLM --enable-lora)", flush=True)


def read_adapter_config(adapter: Path) -> dict:
    """The adapter's ``adapter_config.json``; UserError unless it is a safetensors peft LoRA adapter."""
    if not adapter.is_dir():
        raise UserError(f"{adapter}: adapter folder not found")
    path = adapter / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"{adapter}: not a peft adapter: {ADAPTER_CONFIG} not found")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path}: peft_type: expected 'LORA', got {config.get('peft_type')!r}")
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        found = " (only .bin found; re-save with safe_serialization=True)" if (adapter / "adapter_model.bin").exists() else ""
        raise UserError(f"{adapter}: {ADAPTER_WEIGHTS} not found{found}")
    return config


def find_base(adapter: Path, adapter_config: dict, explicit: str | None) -> Path:
    """The base model folder (see the module docstring for the order)."""
    if explicit:
        base = Path(explicit).expanduser()
        if not (base / "config.json").is_file():
            raise UserError(f"--base: {base}: not a model folder (no config.json)")
        return base
    named = adapter_config.get("base_model_name_or_path")
    if named:
        for candidate in (Path(named).expanduser(), adapter / named):
            if (candidate / "config.json").is_file():
                return candidate
    sibling = adapter.parent / "base"
    if (sibling / "config.json").is_file():
        return sibling
    from ossforge.finetune.run_dir import ensure_recorded_base

    rebuilt = ensure_recorded_base(adapter.parent)  # a large preset run records its base instead of writing it
    if rebuilt is not None:
        return rebuilt
    raise UserError(
        f"{adapter / ADAPTER_CONFIG}: base_model_name_or_path: {named!r} is not a local model folder "
        f"and {sibling} does not exist; pass --base DIR"
    )


def apply_adapter(model, adapter: Path, meta: bool = False):
    """Stock peft ``PeftModel`` over ``model`` with the adapter's weights; every tensor must land.

    ``meta``: ``model`` is on the meta device; the LoRA weights are assigned (real), nothing else exists.
    """
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    weights_path = adapter / ADAPTER_WEIGHTS
    try:
        config = PeftConfig.from_pretrained(str(adapter))
    except Exception as exc:
        raise UserError(f"{adapter / ADAPTER_CONFIG}: not a valid peft config: {exc}") from None
    try:
        weights = load_file(str(weights_path))
    except Exception as exc:
        raise UserError(f"{weights_path}: not a readable safetensors file: {exc}") from None
    config.base_model_name_or_path = model.name_or_path  # the base we actually load (no rename warning)
    config.lora_dropout = 0.0  # irrelevant for merging, and peft's expert wrapper refuses any
    try:
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5: noise here
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, config)
        if meta:
            unexpected, missing = _assign_lora(peft_model, weights)
        else:
            result = set_peft_model_state_dict(peft_model, weights)
            unexpected = list(result.unexpected_keys)
            missing = [k for k in result.missing_keys if "lora_" in k]
    except (ValueError, RuntimeError, KeyError) as exc:  # targets absent from this base, shape mismatches
        raise UserError(f"{adapter}: adapter does not fit base model: {str(exc).splitlines()[0]}") from None
    if unexpected or missing:
        what = f"unexpected tensors {unexpected[:3]}" if unexpected else f"missing tensors {missing[:3]}"
        raise UserError(f"{weights_path}: adapter does not fit base model: {what}")
    return peft_model.eval()


def _assign_lora(peft_model, weights: dict) -> tuple[list[str], list[str]]:
    """Put the adapter file's tensors into a meta-device peft model (peft's loader copies into meta: a no-op).

    Names follow peft's file convention (``...lora_A.weight`` is the parameter ``...lora_A.default.weight``).
    Returns (unexpected file tensors, LoRA parameters left without a tensor).
    """
    import torch

    params = dict(peft_model.named_parameters())
    unexpected = []
    for key, tensor in weights.items():
        name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        if name not in params:
            unexpected.append(key)
            continue
        if tuple(params[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{key}: shape {tuple(tensor.shape)}, the base needs {tuple(params[name].shape)}")
        module_name, _, attr = name.rpartition(".")
        peft_model.get_submodule(module_name)._parameters[attr] = torch.nn.Parameter(tensor.float(), requires_grad=False)
    missing = [n for n, p in peft_model.named_parameters() if "lora_" in n and p.is_meta]
    return unexpected, missing


def probe_ids(vocab_size: int):
    """A short real harmony prompt (user turn + assistant start) as a [1, T] id tensor."""
    import torch

    from ossforge.model.tokenizer import END, MESSAGE, START, encode_text

    ids = [START, *encode_text("user"), MESSAGE, *encode_text(PROBE_TEXT), END, START, *encode_text("assistant")]
    return torch.tensor([[i % vocab_size for i in ids]])


def logit_error(logits, reference) -> dict:
    """Max/mean absolute logit difference, and max relative to the reference's largest logit."""
    diff = (logits.float() - reference.float()).abs()
    scale = reference.float().abs().max().clamp_min(1e-12)
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(), "rel": (diff.max() / scale).item()}


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _check_out(out: Path, adapter: Path, base: Path) -> None:
    resolved = out.resolve()
    for other in (adapter, base):
        other = other.resolve()
        if resolved == other or resolved in other.parents:
            raise UserError(f"--out: {out} would overwrite {other}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out: {out} already exists; delete it or choose a new folder")


def _finish(folder: Path, base: Path, info: dict) -> None:
    """Copy the base's tokenizer/chat-template files (serving stacks want them) and record provenance."""
    for name in TOKENIZER_FILES:
        if (base / name).is_file() and not (folder / name).exists():
            shutil.copy2(base / name, folder / name)
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
