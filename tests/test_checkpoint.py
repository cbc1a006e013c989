"""Loading/saving HF gpt-oss folders: single and sharded safetensors, MXFP4 experts, bad folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GptOssForCausalLM

from ossforge.errors import UserError
from ossforge.finetune.config import ModelConfig
from ossforge.model.checkpoint import (INDEX, atomic_dir, load_folder, load_model, save_base,
                                       save_mxfp4_checkpoint, stored_dtype)
from ossforge.model.mxfp4 import fake_quantize_mxfp4
from ossforge.model.presets import build_random

# <|start|>user<|message|>Hello<|end|><|start|>assistant : real o200k_harmony ids.
PROBE = torch.tensor([[200006, 1428, 200008, 13225, 200007, 200006, 173781]])


def _logits(model, ids=PROBE):
    with torch.no_grad():
        return model(input_ids=ids % model.config.vocab_size).logits


@pytest.fixture(scope="module")
def tiny():
    return build_random("tiny", seed=7).eval()


@pytest.fixture(scope="module")
def small_vocab_dir(tmp_path_factory):
    """A saved tiny base with a 1024-row vocab: the format checks below do not need the real one."""
    folder = tmp_path_factory.mktemp("small") / "base"
    save_base(build_random("tiny", seed=1, vocab_size=1024, pad_token_id=0, eos_token_id=1), folder)
    return folder


def test_preset_load_is_seeded(tiny):
    model = load_model(ModelConfig(preset="tiny", init_seed=7))
    assert not model.training
    assert torch.equal(_logits(model), _logits(tiny))


def test_save_base_then_load_reproduces_logits(tiny, tmp_path):
    out = save_base(tiny, tmp_path / "base")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    loaded = load_model(ModelConfig(path=str(out)))
    assert loaded.dtype == torch.float32
    assert torch.equal(_logits(loaded), _logits(tiny))
    # Anyone can use it: stock transformers reads the same folder to the same logits.
    stock = GptOssForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(_logits(stock), _logits(tiny))
    assert stored_dtype(out) == torch.float32
    assert tiny.name_or_path == str(out.resolve())  # peft records it as base_model_name_or_path


def test_sharded_checkpoint_loads(tiny, tmp_path):
    out = save_base(tiny, tmp_path / "sharded", max_shard_size="20MB")
    index = json.loads((out / INDEX).read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert not (out / "model.safetensors").exists()
    assert torch.equal(_logits(load_model(ModelConfig(path=str(out)))), _logits(tiny))


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the kernel's memory map (Linux)")
def test_loaded_weights_are_owned_not_views_of_the_mapped_file(tiny, tmp_path):
    """A CPU-loaded model holds its own copies: with views of safetensors' memory map, the weights were
    resident only where touched (peak RSS differed 1.51 vs 1.80 GiB between two machines for one run)."""
    folder = save_base(tiny, tmp_path / "base")
    model = load_model(ModelConfig(path=str(folder)))
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(folder) in line]
    assert not mapped, mapped
    assert torch.equal(_logits(model), _logits(tiny))


def test_bf16_load(small_vocab_dir):
    model = load_model(ModelConfig(path=str(small_vocab_dir)), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # rebuilt, not loaded


def test_mxfp4_checkpoint_round_trip(tiny, tmp_path):
    out = save_mxfp4_checkpoint(tiny, tmp_path / "mx", max_shard_bytes=30 * 2**20)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert config["architectures"] == ["GptOssForCausalLM"]
    names = set(json.loads((out / INDEX).read_text())["weight_map"])
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in names
    assert "model.layers.1.mlp.experts.down_proj_scales" in names
    assert "model.layers.0.mlp.experts.gate_up_proj" not in names
    loaded = load_folder(out)
    for ours, orig in zip(loaded.model.layers, tiny.model.layers):
        assert torch.equal(ours.mlp.experts.gate_up_proj, fake_quantize_mxfp4(orig.mlp.experts.gate_up_proj.detach()))
        assert torch.equal(ours.mlp.experts.down_proj, fake_quantize_mxfp4(orig.mlp.experts.down_proj.detach()))
        assert torch.equal(ours.self_attn.q_proj.weight, orig.self_attn.q_proj.weight)
        assert torch.equal(ours.mlp.experts.gate_up_proj_bias, orig.mlp.experts.gate_up_proj_bias)
    # transformers' own MXFP4 path (dequantize on CPU) reads the same folder to identical logits.
    stock = GptOssForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(_logits(stock), _logits(loaded))
    assert not torch.equal(_logits(loaded), _logits(tiny))  # the experts really were quantized


def test_published_style_folder(tiny, tmp_path):
    """A folder as on the Hub: transformers-4.55 config keys, bf16 tensors, MXFP4 experts."""
    out = save_mxfp4_checkpoint(tiny, tmp_path / "pub", dtype=torch.bfloat16)
    cfg = json.loads((out / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = int(rope.pop("rope_theta"))
    cfg.update(rope_scaling=rope, experts_per_token=4, initial_context_length=4096,
               transformers_version="4.55.0.dev0", torch_dtype="bfloat16")
    cfg.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(cfg))
    assert stored_dtype(out) == torch.bfloat16
    model = load_model(ModelConfig(path=str(out)), dtype=torch.bfloat16)
    assert model.config.rope_parameters["rope_type"] == "yarn"
    assert model.config.rope_parameters["rope_theta"] == tiny.config.rope_parameters["rope_theta"]
    assert model.dtype == torch.bfloat16
    ref = fake_quantize_mxfp4(tiny.model.layers[1].mlp.experts.down_proj.detach())  # exact in bf16 too
    assert torch.equal(model.model.layers[1].mlp.experts.down_proj, ref.to(torch.bfloat16))
    assert torch.equal(model.model.layers[0].self_attn.sinks, tiny.model.layers[0].self_attn.sinks.to(torch.bfloat16))


def test_atomic_dir_keeps_old_contents_on_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.bin").write_text("x")
            raise RuntimeError("killed")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]


def test_save_base_refuses_wrapped_models(tmp_path):
    with pytest.raises(TypeError, match="plain GptOssForCausalLM"):
        save_base(torch.nn.Linear(2, 2), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# -- bad folders: UserError naming the folder or file ------------------------------------------

def _copy(src, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    return dst


def _load(folder):
    return load_model(ModelConfig(path=str(folder)))


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path / 'nope'}: model folder not found"):
        _load(tmp_path / "nope")


def test_missing_config(small_vocab_dir, tmp_path):
    folder = _copy(small_vocab_dir, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match=r"config\.json: file not found"):
        _load(folder)


def test_malformed_config_names_the_line(small_vocab_dir, tmp_path):
    folder = _copy(small_vocab_dir, tmp_path)
    (folder / "config.json").write_text('{\n  "model_type": "gpt_oss",\n  "hidden_size": ,\n}\n')
    with pytest.raises(UserError, match=r"config\.json:3: invalid JSON"):
        _load(folder)


def test_wrong_model_type(small_vocab_dir, tmp_path):
    folder = _copy(small_vocab_dir, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="model_type: expected 'gpt_oss', got 'llama'"):
        _load(folder)


def test_no_weights_and_bin_only(small_vocab_dir, tmp_path):
    folder = _copy(small_vocab_dir, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no weights: expected model.safetensors"):
        _load(folder)
    (folder / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(UserError, match="only safetensors"):
        _load(folder)


def test_index_with_missing_shard(tiny, tmp_path):
    folder = save_base(tiny, tmp_path / "sh", max_shard_size="20MB")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(UserError, match=f"{INDEX}: weight_map.*shard file not found: .*{shard.name}"):
        _load(folder)


def test_truncated_safetensors(small_vocab_dir, tmp_path):
    folder = _copy(small_vocab_dir, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match=r"model\.safetensors: "):
        _load(folder)


def test_missing_and_mismatched_tensors(small_vocab_dir, tmp_path):
    folder = _copy(small_vocab_dir, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.sinks"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(UserError, match="missing tensor model.layers.1.self_attn.sinks"):
        _load(folder)
    tensors["model.layers.1.self_attn.sinks"] = torch.zeros(7)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(UserError, match=r"model.layers.1.self_attn.sinks: shape \(7,\), config expects \(4,\)"):
        _load(folder)
    tensors["model.layers.1.self_attn.sinks"] = torch.zeros(4)
    tensors["model.layers.9.extra"] = torch.zeros(1)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(UserError, match="unexpected tensors .*model.layers.9.extra"):
        _load(folder)
