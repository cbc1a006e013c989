"""Rank-sharded loading at real scale, on the meta device: gpt-oss-120b at EP=8 materialises <= 31 GiB of
weights per rank and never a full-size expert tensor, from a published-layout MXFP4 folder (real
safetensors headers over sparse files: shapes without data) and from the preset; plus the small-scale
facts the big one rests on (a sharded load equals the full load's slice, presets and expert LoRA do
not depend on the EP size)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ossforge.model.local_experts import ep_expert_range, expert_modules, meta_model

GIB = 1024**3


class CreatedTensors(TorchDispatchMode):
    """Every tensor any aten op produces while active: the largest one, and how many bytes in all."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.largest_op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.largest_op = t.numel(), (str(func), tuple(t.shape))
        return out


def _published_tensors(config) -> dict[str, tuple[str, list[int]]]:
    """Name -> (safetensors dtype, shape) as in openai/gpt-oss-*: bf16, experts as MXFP4 blocks/scales."""
    out = {}
    for name, t in meta_model(config).state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, fan_in, rows = t.shape
            out[f"{name}_blocks"] = ("U8", [e, rows, fan_in // 32, 16])
            out[f"{name}_scales"] = ("U8", [e, rows, fan_in // 32])
        else:
            out[name] = ("BF16", list(t.shape))
    return out


def _write_header_only(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A valid safetensors file whose data region is a hole (sparse: no disk, reads as zeros)."""
    size = {"U8": 1, "BF16": 2}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = size[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)


@pytest.fixture(scope="module")
def fake_120b(tmp_path_factory):
    """gpt-oss-120b's config.json and sharded safetensors index, one shard per layer, data absent."""
    from ossforge.model.presets import PRESETS, make_config

    folder = tmp_path_factory.mktemp("gpt-oss-120b")
    tensors = _published_tensors(make_config("gpt-oss-120b"))
    shards: dict[str, dict] = {}
    for name, spec in tensors.items():
        key = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        shards.setdefault(key, {})[name] = spec
    weight_map = {}
    for i, (key, group) in enumerate(sorted(shards.items())):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_header_only(folder / file, group)
        weight_map.update({name: file for name in group})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"model_type": "gpt_oss", **PRESETS["gpt-oss-120b"],
              "quantization_config": {"quant_method": "mxfp4"}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _check_rank_share(model, created: CreatedTensors, expert_range, lora: bool):
    config = model.config
    full_expert = config.num_local_experts * config.hidden_size * config.intermediate_size  # down_proj, the smaller
    assert created.largest < full_expert, f"a full-size expert tensor was created: {created.largest_op}"
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
    assert weights <= 31 * GIB, weights / GIB
    local = expert_range[1] - expert_range[0]
    for _, experts in expert_modules(model):
        assert experts.gate_up_proj.shape[0] == experts.down_proj.shape[0] == local
        assert experts.expert_range == expert_range and experts.num_global_experts == config.num_local_experts
        assert experts.gate_up_proj.dtype == torch.bfloat16
    if lora:
        a = [p for n, p in model.named_parameters() if "experts" in n and "lora_A" in n]
        assert a and all(p.shape[0] == 16 * local for p in a)  # r=16 per local expert, peft's layout
    return weights


@pytest.mark.parametrize("rank", [0, 7])
def test_120b_folder_at_ep8_materialises_one_eighth_of_the_experts(fake_120b, rank):
    from ossforge.finetune.config import LoraConfig
    from ossforge.finetune.lora import apply_lora
    from ossforge.model.checkpoint import materialise_from_folder, read_config

    model = meta_model(read_config(fake_120b))
    local = ep_expert_range(128, rank, 8)
    created = CreatedTensors()
    with created:  # the loader's real work: read slices, dequantise MXFP4 (nothing read on meta), assign
        materialise_from_folder(model, fake_120b, dtype=torch.bfloat16, device="meta", expert_range=local)
        model = apply_lora(model, LoraConfig(r=16, alpha=32), seed=0)
    weights = _check_rank_share(model, created, local, lora=True)
    assert 30 * GIB < weights  # dense ~3.9 GiB + 16 of 128 experts ~26.7 GiB, in bf16


def test_120b_preset_at_ep8_initialises_only_the_local_experts():
    from ossforge.model.presets import init_random, make_config

    model = meta_model(make_config("gpt-oss-120b"))
    local = ep_expert_range(128, 3, 8)
    created = CreatedTensors()
    with created:
        init_random(model, seed=0, dtype=torch.bfloat16, device="meta", expert_range=local)
    _check_rank_share(model, created, local, lora=False)


def test_sharded_mxfp4_load_equals_the_full_loads_slice(tmp_path):
    from ossforge.model.checkpoint import load_folder, save_mxfp4_checkpoint
    from ossforge.model.presets import build_random

    save_mxfp4_checkpoint(build_random("tiny", seed=1), tmp_path / "mx", max_shard_bytes=300_000)
    assert (tmp_path / "mx" / "model.safetensors.index.json").is_file()  # sharded
    full = load_folder(tmp_path / "mx").state_dict()
    for rank in range(2):
        start, stop = ep_expert_range(8, rank, 2)
        part = load_folder(tmp_path / "mx", expert_range=(start, stop)).state_dict()
        for name, tensor in full.items():
            expected = tensor[start:stop] if ".experts." in name else tensor
            assert torch.equal(part[name], expected), name


def test_large_presets_and_expert_lora_do_not_depend_on_the_ep_size(monkeypatch):
    """Above WHOLE_BUILD_MAX_PARAMS a preset seeds each expert by its global index; expert LoRA A is
    always drawn per global expert. Checked on the tiny shape with the threshold lowered."""
    from ossforge.finetune.config import LoraConfig
    from ossforge.finetune.lora import apply_lora
    from ossforge.model import presets

    monkeypatch.setattr(presets, "WHOLE_BUILD_MAX_PARAMS", 0)
    lora = LoraConfig(r=2, alpha=4)

    def build(expert_range=None):
        model = presets.build_random("tiny", seed=5, expert_range=expert_range)
        torch.manual_seed(9)  # attention LoRA: the trainer seeds peft's draws the same on every rank
        return apply_lora(model, lora, seed=9).state_dict()

    whole = build()
    halves = [build(ep_expert_range(8, r, 2)) for r in range(2)]
    from ossforge.finetune.expert_parallel import _join_b

    for name, tensor in whole.items():
        if ".experts." not in name:
            assert torch.equal(halves[0][name], tensor) and torch.equal(halves[1][name], tensor), name
        elif "lora_B" in name:
            assert torch.equal(_join_b([h[name] for h in halves], 8), tensor), name
        else:  # base experts [E, ...] and LoRA A [E*r, in]: rank 0 holds the first half
            assert torch.equal(torch.cat([h[name] for h in halves]), tensor), name
    a = [t for n, t in whole.items() if "experts" in n and "lora_A" in n]
    assert a and all(t.abs().max() > 0 for t in a)
    # different experts, different draws
    assert not torch.equal(a[0][:2], a[0][2:4])


def test_a_large_preset_base_is_recorded_and_merge_rebuilds_it(tmp_path, monkeypatch):
    """Above BASE_MAX_BYTES the run writes base_record.json instead of base/ (thresholds lowered so the
    tiny preset stands in for 120b); `ossforge merge` rebuilds exactly the trained-on base from it."""
    import yaml
    from safetensors.torch import load_file

    from ossforge.cli import main
    from ossforge.finetune import trainer
    from ossforge.finetune.config import load_config
    from ossforge.model import presets
    from ossforge.model.checkpoint import load_folder

    monkeypatch.setattr(presets, "WHOLE_BUILD_MAX_PARAMS", 0)
    monkeypatch.setattr(trainer, "BASE_MAX_BYTES", 0)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"preset": "tiny", "init_seed": 4}, "lora": {"r": 2, "alpha": 4},
        "data": {"train": str(Path(__file__).parents[1] / "data" / "medicine" / "train.jsonl")},
        "training": {"max_steps": 1, "seq_len": 512}, "output_dir": str(tmp_path / "run")}))
    trainer.train(load_config(cfg))
    run = tmp_path / "run"
    assert not (run / "base").exists()
    assert json.loads((run / "base_record.json").read_text()) == {"preset": "tiny", "init_seed": 4, "dtype": "float32"}
    assert main(["merge", "--adapter", str(run / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    rebuilt = load_folder(run / "base").state_dict()
    expected = presets.build_random("tiny", seed=4).state_dict()
    assert rebuilt.keys() == expected.keys() and all(torch.equal(rebuilt[k], expected[k]) for k in expected)
    merged = load_file(next((tmp_path / "merged").glob("*.safetensors")))
    assert any(not torch.equal(merged[k], expected[k]) for k in merged if k in expected)  # the adapter is in
