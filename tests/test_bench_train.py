"""`ossforge bench train`: both paths on the tiny preset on CPU, the FLOP count at the real shapes."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli


def test_bench_train_tiny_both_paths(tmp_path):
    out = tmp_path / "train.json"
    proc = run_cli("bench", "train", "--shape", "tiny", "--device", "cpu", "--seq", "64", "--steps", "1",
                   "--warmup", "0", "--gpu-mem-gib", "8", "--max-seq", "128", "--json", str(out),
                   env={"OSSFORGE_MOE_BACKEND": "torch"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result["paths"]) == {"ossforge", "stock"}
    ossforge, stock = result["paths"]["ossforge"], result["paths"]["stock"]
    for row in (ossforge, stock):
        assert row["tokens_per_s"] > 0 and row["tflops"] > 0 and row["pct_dense"] > 0
        assert row["peak_above_start_gib"] >= 0
        # 8 GiB holds a 128-token step of the tiny model at this and at full depth (tiny is full depth)
        assert row["longest_seq"]["reduced_depth"] == 128 == row["longest_seq"]["full_depth"]
    # same model, same batch, same LoRA: the fused/trained-token path and the stock path agree
    assert ossforge["initial_loss"] == pytest.approx(stock["initial_loss"], rel=1e-5)
    assert result["initial_loss_rel_diff"] < 1e-5
    assert "fuse_moe" in ossforge["experts"] and "grouped_mm" in stock["experts"]
    assert result["ratio"]["tokens_per_s"] > 0
    assert result["layers"] == 2 and result["tokens_per_step"] == 64
    assert "ossforge / stock" in proc.stdout and "stock" in proc.stdout


@pytest.mark.parametrize("preset, published", [("gpt-oss-20b", 3.6e9), ("gpt-oss-120b", 5.1e9)])
def test_step_flops_count_the_published_active_parameters(preset, published):
    """With r=0 and a short sequence, FLOPs/step ~ 4 x active parameters x tokens (OpenAI's model card:
    3.6B active for 20b, 5.1B for 120b, unembedding included)."""
    from ossforge.finetune.bench_train import step_flops
    from ossforge.model.presets import make_config

    config = make_config(preset)
    tokens = 8
    n_active = step_flops(config, 1, tokens, rank=0) / (4 * tokens)
    assert n_active == pytest.approx(published, rel=0.02)
    # attention grows quadratically on full layers and linearly on sliding (window 128) ones
    assert step_flops(config, 1, 8192, rank=0) > 2.05 * step_flops(config, 1, 4096, rank=0)
    with_lora = step_flops(config, 1, tokens, rank=16) - step_flops(config, 1, tokens, rank=0)
    h, i = 2880, 2880
    per_layer = (2880 + 4096) * 2 + (2880 + 512) * 2 + 4 * ((h + 2 * i) + (i + h))
    assert with_lora == 6 * 16 * per_layer * config.num_hidden_layers * tokens


def test_bench_train_bad_layers_is_user_error():
    proc = run_cli("bench", "train", "--shape", "tiny", "--device", "cpu", "--layers", "5")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --layers:")


def test_missing_layers_scale_the_peak_to_full_depth():
    """A 1-of-2-layer tiny model: the left-out layer adds its frozen weights, its LoRA (weights, gradients,
    fp32 Adam m and v) and, under checkpointing, one saved hidden row per token."""
    import torch

    from ossforge.finetune.bench_train import build_model, missing_layer_bytes

    model = build_model("tiny", 1, 4, torch.float32, torch.device("cpu"), checkpointing=True)
    layer = model.base_model.model.model.layers[0]
    frozen = sum(p.numel() * 4 for p in layer.parameters() if not p.requires_grad)
    lora = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert lora > 0 and frozen > 0
    assert missing_layer_bytes(model, 100, True) == frozen + lora * (4 + 4 + 8) + 100 * 64 * 4
    assert missing_layer_bytes(model, 100, False) is None
