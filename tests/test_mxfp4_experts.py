"""MXFP4-resident experts in the model: the packed parameter stand-in, peft, loading, memory, training end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from ossforge.model import fuse_moe
from ossforge.model.checkpoint import load_folder, save_mxfp4_checkpoint
from ossforge.model.mxfp4 import quantize_mxfp4
from ossforge.model.mxfp4_experts import (
    MXFP4Tensor,
    expert_modules,
    install_mxfp4_expert_weight,
    quantize_experts_,
    resident_expert_bytes,
    resolve_expert_format,
)
from ossforge.model.presets import build_random
from tests.conftest import REPO, run_cli

IDS = torch.tensor([[200006, 17360, 200008, 3575, 553, 261, 10297, 29186, 13, 200007, 200006, 1428]])
DATA = REPO / "tests" / "fixtures" / "train" / "dosing_small.jsonl"
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _dequantised_copy(model):
    """The same model with every packed expert weight replaced by its dense dequantisation."""
    dense = copy.deepcopy(model)
    for experts in expert_modules(dense):
        for name in ("gate_up_proj", "down_proj"):
            experts._parameters[name] = torch.nn.Parameter(experts._parameters[name].dequantize())
    return dense


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def test_packed_parameter_behaves_like_a_frozen_expert_weight():
    model = quantize_experts_(build_random("tiny", seed=0))
    experts = expert_modules(model)[0]
    w = experts.gate_up_proj
    assert isinstance(w, MXFP4Tensor) and isinstance(w, torch.nn.Parameter) and not w.requires_grad
    assert w.shape == (8, 64, 128) and w.dtype == torch.float32
    dense = w.dequantize()
    assert torch.equal(w[3] + 0, dense[3])  # any other op sees the dequantised values
    run = w[2:5]  # expert parallelism keeps a run of experts: still packed, the same values
    assert isinstance(run, MXFP4Tensor) and run.shape == (3, 64, 128) and torch.equal(run.dequantize(), dense[2:5])
    model.to(torch.bfloat16)
    assert isinstance(experts.gate_up_proj, MXFP4Tensor) and experts.gate_up_proj.dtype == torch.bfloat16
    assert torch.equal(experts.gate_up_proj.blocks, w.blocks)  # the bytes did not change
    with pytest.raises(RuntimeError, match="frozen"):
        with torch.no_grad():
            experts.gate_up_proj.add_(1)
    with pytest.raises(ValueError, match="expects"):
        blocks, scales = quantize_mxfp4(torch.zeros(8, 32, 128))
        install_mxfp4_expert_weight(experts, "gate_up_proj", blocks, scales)


def test_expert_format_resolution():
    assert resolve_expert_format("auto", folder_is_mxfp4=True, device="cuda:0") == "mxfp4"
    assert resolve_expert_format("auto", folder_is_mxfp4=True, device="cpu") == "bf16"
    assert resolve_expert_format("auto", folder_is_mxfp4=False, device="cuda") == "bf16"
    assert resolve_expert_format("mxfp4", folder_is_mxfp4=False, device="cpu") == "mxfp4"
    with pytest.raises(ValueError):
        resolve_expert_format("fp8", folder_is_mxfp4=True, device="cpu")


def test_packed_layer_matches_dequantised_layer_outputs_and_lora_grads(backend="torch"):
    """Logits, loss and every LoRA gradient (attention + both expert factors, both layers) to <= 1e-5 relative.

    The torch backend here; the Triton kernels get the same check per layer in test_mxfp4_kernels.py (the whole
    model under the interpreter takes minutes).
    """
    from peft import LoraConfig, get_peft_model

    packed = quantize_experts_(build_random("tiny", seed=1))
    dense = _dequantised_copy(packed)
    models = []
    for m in (packed, dense):
        torch.manual_seed(0)
        cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj"],
                         target_parameters=TARGETS)
        models.append(fuse_moe(get_peft_model(m, cfg), backend=backend))
    results = []
    for m in models:
        out = m(input_ids=IDS, labels=IDS)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    assert _rel(results[0][0], results[1][0]) <= 1e-5
    assert results[0][1].keys() == results[1][1].keys()
    assert sum("experts" in n for n in results[0][1]) == 8  # A and B of gate_up and down in both layers
    for name, grad in results[0][1].items():
        assert grad.abs().sum() > 0, name
        assert _rel(grad, results[1][1][name]) <= 1e-5, name


def test_resident_expert_bytes_are_the_mxfp4_size():
    """Experts of the real gpt-oss width (H = I = 2880; 2 experts, 1 layer): 4.25 bits per parameter."""
    model = build_random("tiny", hidden_size=2880, intermediate_size=2880, num_local_experts=2, num_hidden_layers=1,
                         layer_types=["full_attention"], num_attention_heads=1, num_key_value_heads=1, head_dim=16,
                         vocab_size=32, pad_token_id=0, eos_token_id=1)
    params = sum(p.numel() for e in expert_modules(model) for p in (e.gate_up_proj, e.down_proj))
    quantize_experts_(model)
    measured = resident_expert_bytes(model)
    assert abs(measured - params * 4.25 / 8) <= 0.05 * params * 4.25 / 8
    storages = {p.untyped_storage().data_ptr() for e in expert_modules(model)
                for w in (e.gate_up_proj, e.down_proj) for p in (w.blocks, w.scales)}
    assert len(storages) == 4 and all(type(p) is not MXFP4Tensor for p in model.parameters() if p.dim() < 3)
    assert measured == sum(t.untyped_storage().nbytes() for e in expert_modules(model)
                           for w in (e.gate_up_proj, e.down_proj) for t in (w.blocks, w.scales))


def test_mxfp4_folder_loads_packed_and_dense(tmp_path):
    model = build_random("tiny", seed=2)
    save_mxfp4_checkpoint(model, tmp_path / "mx")
    packed = load_folder(tmp_path / "mx", expert_format="mxfp4")
    dense = load_folder(tmp_path / "mx")
    for p_exp, d_exp in zip(expert_modules(packed), expert_modules(dense)):
        assert isinstance(p_exp.down_proj, MXFP4Tensor) and not isinstance(d_exp.down_proj, MXFP4Tensor)
        assert torch.equal(p_exp.down_proj.dequantize(), d_exp.down_proj)
    with torch.no_grad():
        assert torch.equal(fuse_moe(packed)(input_ids=IDS).logits, fuse_moe(dense)(input_ids=IDS).logits)


def _train_config(folder: Path, name: str, model_path: Path, fmt: str) -> Path:
    cfg = {
        "model": {"path": str(model_path), "expert_format": fmt},
        "data": {"train": str(DATA)},
        "lora": {"r": 4, "alpha": 8},
        "training": {"max_steps": 10, "lr": 5e-3, "micro_batch_size": 2, "grad_accum": 1, "seq_len": 64,
                     "warmup_steps": 2, "seed": 3},
        "output_dir": str(folder / name),
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_ossforge_train_mxfp4_equals_bf16_and_adapter_loads_in_stock_peft(tmp_path):
    from peft import PeftModel

    save_mxfp4_checkpoint(build_random("tiny", seed=4), tmp_path / "base")
    from ossforge.finetune.config import load_config
    from ossforge.finetune.trainer import train

    result = run_cli("train", str(_train_config(tmp_path, "mxfp4", tmp_path / "base", "mxfp4")))
    assert result.returncode == 0, result.stderr[-3000:]
    bf16 = _train_config(tmp_path, "bf16", tmp_path / "base", "bf16")
    train(load_config(bf16, []), config_path=str(bf16))  # in process: saves a second interpreter start
    losses = {}
    for fmt in ("mxfp4", "bf16"):
        records = [json.loads(line) for line in (tmp_path / fmt / "metrics.jsonl").read_text().splitlines()]
        losses[fmt] = [r["loss"] for r in records]
    assert len(losses["mxfp4"]) == 10
    for a, b in zip(losses["mxfp4"], losses["bf16"]):
        assert abs(a - b) <= 1e-4 * abs(b)
    assert losses["mxfp4"][-1] < losses["mxfp4"][0]

    # The adapter trained over packed experts, in stock peft on the dequantised base, and on the packed base.
    adapter = tmp_path / "mxfp4" / "adapter"
    base = load_folder(tmp_path / "base")
    stock = PeftModel.from_pretrained(base, str(adapter))
    packed = fuse_moe(PeftModel.from_pretrained(load_folder(tmp_path / "base", expert_format="mxfp4"), str(adapter)))
    with torch.no_grad():
        want = stock(input_ids=IDS).logits
        assert _rel(packed(input_ids=IDS).logits, want) <= 1e-5
        with stock.disable_adapter():
            assert not torch.allclose(stock(input_ids=IDS).logits, want, atol=1e-5)


def _plan(tmp_path, preset, **deepspeed):
    from ossforge.finetune.config import load_config
    from ossforge.finetune.plan import make_plan

    cfg = {"model": {"preset": preset, "expert_format": "mxfp4"}, "data": {"train": str(DATA)},
           "lora": {"r": 16, "alpha": 32}, "deepspeed": deepspeed, "output_dir": str(tmp_path / "run"),
           "training": {"micro_batch_size": 1, "seq_len": 2048, "gradient_checkpointing": True}}
    path = tmp_path / f"{preset}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return make_plan(load_config(path, check_files=False), path, gpus=1, gpu_mem_gib=80)


def test_expert_bytes_at_the_real_shapes():
    from ossforge.model.mxfp4 import expert_bytes

    per_layer = 2880 * 5760 + 2880 * 2880  # gate_up + down of one expert
    gib = 1024**3
    assert abs(expert_bytes(24 * 32 * per_layer, "mxfp4") / 1e9 - 10.15) < 0.01  # 20b: 10.15 GB = 9.45 GiB
    assert abs(expert_bytes(36 * 128 * per_layer, "mxfp4") / 1e9 - 60.9) < 0.1  # 120b: 60.9 GB = 56.7 GiB
    assert expert_bytes(100, "bf16") == 200 and expert_bytes(100, "bf16", 4) == 400
    assert abs(expert_bytes(36 * 128 * per_layer, "mxfp4") / gib - 56.7) < 0.1


def test_plan_counts_mxfp4_experts_and_offloaded_optimizer(tmp_path):
    plan20 = _plan(tmp_path, "gpt-oss-20b")
    assert plan20.expert_format == "mxfp4" and abs(plan20.weights_expert_gib - 9.46) < 0.02
    on_gpu = _plan(tmp_path, "gpt-oss-120b", zero_optimization={"stage": 2})
    offload = _plan(tmp_path, "gpt-oss-120b", zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}})
    assert abs(offload.weights_expert_gib - 56.75) < 0.02
    assert on_gpu.host_optimizer_gib == 0 and on_gpu.optimizer_gib > 11 and not on_gpu.optimizer_offload
    # fp32 master + two moments + fp32 grads of the ~1.07B LoRA params move to the host
    assert offload.optimizer_gib == 0 and abs(offload.host_optimizer_gib - 16.0) < 0.1
    assert offload.per_gpu_gib < on_gpu.per_gpu_gib - 13 and offload.fits and not on_gpu.fits
