"""Rank-sharded loading on 2 CPU ranks (DeepSpeed launcher): a sharded MXFP4 folder of an expert-heavy
model (experts > 90% of its bytes) loads at EP=2 with each rank's peak host RSS, during the load and the
first step, within 1.25x of (dense + half the experts + LoRA/optimizer + activations) and far below the
full model; EP=2 trains to the same losses as EP=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MIB = 1024**2

SHAPE = dict(hidden_size=256, intermediate_size=256, num_local_experts=64, num_hidden_layers=8,
             layer_types=["sliding_attention", "full_attention"] * 4, vocab_size=4096, head_dim=64,
             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def expert_heavy_folder(tmp_path_factory):
    """The published layout: bf16-free fp32 dense tensors, MXFP4 expert blocks/scales, 8 shards."""
    from ossforge.model.checkpoint import save_mxfp4_checkpoint
    from ossforge.model.presets import build_random

    model = build_random("tiny", seed=0, **SHAPE)
    sizes = {"experts": 0, "dense": 0}
    for name, p in model.named_parameters():
        sizes["experts" if ".experts." in name else "dense"] += p.numel() * p.element_size()
    folder = tmp_path_factory.mktemp("mx") / "expert-heavy"
    save_mxfp4_checkpoint(model, folder, max_shard_bytes=12 * MIB)
    del model
    return folder, sizes


def _activation_bytes(tokens: int, seq: int, batch: int) -> int:
    """Generous estimate of what one step keeps for backward at this shape (fp32): per layer, ~24
    hidden-sized rows and the top-4 expert rows (gate/up, SwiGLU, down) per token, the eager attention
    scores, and the logits of every token (the test trains on all of them)."""
    h, i, k, heads, layers, vocab = 256, 256, 4, 4, 8, 4096
    per_layer = tokens * (24 * h + k * (2 * i + i + 2 * h)) + 3 * batch * heads * seq * (seq + 1)
    return 4 * (layers * per_layer + 3 * tokens * vocab)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ep2_rank_holds_half_the_experts_and_matches_ep1(expert_heavy_folder, tmp_path):
    folder, sizes = expert_heavy_folder
    assert sizes["experts"] >= 0.7 * (sizes["experts"] + sizes["dense"])
    assert (folder / "model.safetensors.index.json").is_file()
    data = tmp_path / "train.jsonl"
    data.write_text("")
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(folder), "dtype": "fp32"}, "data": {"train": str(data)},
        "lora": {"r": 4, "alpha": 8}, "training": {"lr": 1e-2, "micro_batch_size": 2, "seed": 0},
        "parallel": {"expert_parallel_size": 2}, "output_dir": str(tmp_path / "run")}))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_free_port()),
           "tests/load_worker.py", "--config", str(config), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    full = sizes["experts"] + sizes["dense"]
    figures = []
    for r, result in enumerate(ranks):
        ep2, ep1 = result["ep2"], result["ep1"]
        weights = ep2["weights"]
        assert weights["experts"] == sizes["experts"] // 2 and weights["dense"] == sizes["dense"]
        assert ep1["weights"]["experts"] == sizes["experts"]  # the EP=1 run holds them all
        budget = (weights["dense"] + weights["experts"] + 4 * ep2["trainable_bytes"]  # LoRA, grads, 2 Adam moments
                  + _activation_bytes(tokens=2 * 64, seq=64, batch=2))
        peak = max(ep2["after_load"], ep2["after_first_step"])
        peak_ep1 = max(ep1["after_load"], ep1["after_first_step"])
        figures.append(f"rank {r}: EP=2 peak RSS +{peak / MIB:.0f} MiB (after load +{ep2['after_load'] / MIB:.0f}), "
                       f"budget {budget / MIB:.0f} MiB ({peak / budget:.2f}x); EP=1 peak +{peak_ep1 / MIB:.0f} MiB; "
                       f"full model {full / MIB:.0f} MiB")
        assert peak <= 1.25 * budget, figures
        assert peak < full and peak < 0.8 * peak_ep1, figures  # far below what the whole model takes
        for step, (x, y) in enumerate(zip(ep2["losses"], ep1["losses"])):
            assert abs(x - y) <= 1e-4 * abs(y), (r, step, x, y)
    print("\n".join(figures))
