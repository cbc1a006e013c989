"""Merge a LoRA adapter (attention + expert LoRA) into its base and write an HF checkpoint.

The output loads with stock ``GptOssForCausalLM.from_pretrained(OUT)``. The base is, in order:
``--base DIR``; the adapter's ``base_model_name_or_path`` when that is a local folder; the
``base/`` folder the trainer writes beside ``adapter/`` for random-initialised presets.

The merge is peft's own ``merge_and_unload`` (it folds ``target_parameters`` expert LoRA into
``gate_up_proj``/``down_proj`` as well); the logits of a short probe before and after merging
are compared and printed. ``--mxfp4`` writes the experts in the published MXFP4 format and
prints the logit error that quantization adds on the same probe.

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

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
PROBE_TEXT = "What is the paediatric paracetamol dose for a 20 kg child?"
INFO_FILE = "ossforge_merge.json"


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


def run(args: argparse.Namespace) -> int:
    adapter = Path(args.adapter).expanduser()
    adapter_config = read_adapter_config(adapter)
    base = find_base(adapter, adapter_config, args.base)
    out = Path(args.out).expanduser()
    _check_out(out, adapter, base)

    import torch  # after the checks: a mistyped path fails in a blink

    from ossforge.model.checkpoint import atomic_dir, load_folder, read_config, stored_dtype, write_mxfp4_folder
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
    model = load_folder(base, dtype=dtype)
    peft_model = apply_adapter(model, adapter)
    probe = probe_ids(model.config.vocab_size)
    adapter_logits = _logits(peft_model, probe)
    merged = peft_model.merge_and_unload()
    merged_logits = _logits(merged, probe)
    merge_err = logit_error(merged_logits, adapter_logits)
    print(f"merge check (probe of {probe.shape[1]} tokens): max |dlogit| {merge_err['max_abs']:.3e}, "
          f"mean {merge_err['mean_abs']:.3e}, rel {merge_err['rel']:.3e}")
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    if not merge_err["rel"] <= tolerance:
        print(f"warning: merged logits differ from the adapter model's by rel {merge_err['rel']:.3e} "
              f"(> {tolerance:g})", flush=True)

    info = {"base": str(base), "adapter": str(adapter), "dtype": str(dtype).removeprefix("torch."),
            "mxfp4": bool(args.mxfp4), "merge_logit_error": merge_err}
    with atomic_dir(out) as tmp:
        if args.mxfp4:
            write_mxfp4_folder(merged, tmp, roundtrip_in_place=True)
            quant_err = logit_error(_logits(merged, probe), merged_logits)
            info["mxfp4_logit_error"] = quant_err
            print(f"mxfp4 logit error vs merged {info['dtype']}: max |dlogit| {quant_err['max_abs']:.3e}, "
                  f"mean {quant_err['mean_abs']:.3e}, rel {quant_err['rel']:.3e}")
        else:
            merged.save_pretrained(tmp, safe_serialization=True)
        _finish(tmp, base, info)
    print(f"wrote {out}")
    return 0


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


def apply_adapter(model, adapter: Path):
    """Stock peft ``PeftModel`` over ``model`` with the adapter's weights; every tensor must land."""
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
        result = set_peft_model_state_dict(peft_model, weights)
    except (ValueError, RuntimeError, KeyError) as exc:  # targets absent from this base, shape mismatches
        raise UserError(f"{adapter}: adapter does not fit base model: {str(exc).splitlines()[0]}") from None
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if unexpected or missing:
        what = f"unexpected tensors {unexpected[:3]}" if unexpected else f"missing tensors {missing[:3]}"
        raise UserError(f"{weights_path}: adapter does not fit base model: {what}")
    return peft_model.eval()


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
