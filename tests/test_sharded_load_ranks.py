"""Rank-sharded loading on 2 CPU ranks (DeepSpeed launcher): a sharded MXFP4 folder of an expert-heavy
model (experts > 90% of its bytes) loads at EP=2 with each rank's peak host RSS, during the load and the
first step, within 1.25x of (dense + half the experts + LoRA/optimizer + activations) and far below the
full model; EP=2 trains to the same losses as EP=1. With ``model.expert_format: mxfp4`` each rank keeps
only its own experts' MXFP4 blocks and scales, trains like the dequantised experts and like EP=1, and
``deepspeed.initialize`` neither dequantises nor overwrites any rank's experts."""

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


def _mxfp4_folder(factory, name: str, shape: dict, shard_bytes: int):
    """A random model of ``shape`` in the published layout (fp32 dense tensors, MXFP4 expert blocks/scales,
    sharded), with the fp32 bytes of its experts and dense weights and its expert parameter count."""
    from ossforge.model.checkpoint import save_mxfp4_checkpoint
    from ossforge.model.presets import build_random

    model = build_random("tiny", seed=0, **shape)
    sizes = {"experts": 0, "dense": 0, "expert_params": 0}
    for pname, p in model.named_parameters():
        sizes["experts" if ".experts." in pname else "dense"] += p.numel() * p.element_size()
        if pname.endswith(("experts.gate_up_proj", "experts.down_proj")):
            sizes["expert_params"] += p.numel()
    folder = factory.mktemp("mx") / name
    save_mxfp4_checkpoint(model, folder, max_shard_bytes=shard_bytes)
    del model
    return folder, sizes


@pytest.fixture(scope="module")
def expert_heavy_folder(tmp_path_factory):
    """8 shards of the expert-heavy model."""
    return _mxfp4_folder(tmp_path_factory, "expert-heavy", SHAPE, 12 * MIB)


def _config(tmp_path, folder, **model) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("")
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(folder), "dtype": "fp32", **model}, "data": {"train": str(data)},
        "lora": {"r": 4, "alpha": 8}, "training": {"lr": 1e-2, "micro_batch_size": 2, "seed": 0},
        "parallel": {"expert_parallel_size": 2}, "output_dir": str(tmp_path / "run")}))
    return config


def _launch(tmp_path, config: Path, *worker_args: str) -> list[dict]:
    """``tests/load_worker.py`` on 2 CPU ranks; each rank's results."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_free_port()),
           "tests/load_worker.py", "--config", str(config), "--out", str(tmp_path), *worker_args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


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
    ranks = _launch(tmp_path, _config(tmp_path, folder))

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


# 32 experts over 4 layers: experts are ~80% of the fp32 weights, MXFP4 keeps them at 4.25 bits.
PACKED_SHAPE = dict(hidden_size=128, intermediate_size=128, num_local_experts=32, num_hidden_layers=4,
                    layer_types=["sliding_attention", "full_attention"] * 2, vocab_size=4096, head_dim=32,
                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ep2_mxfp4_rank_keeps_only_its_packed_experts_and_trains_like_bf16_and_ep1(tmp_path_factory, tmp_path):
    """``model.expert_format: mxfp4`` through the sharded loader at EP=2, on 2 ranks: (a) each rank's expert
    weights hold the MXFP4 size of its own experts only (measured on the parameters' storages); (b) the
    losses equal EP=2 with dequantised experts and EP=1 with packed ones; (c) the adapter loads in stock
    peft on the dequantised base and gives the trained model's logits. And ``deepspeed.initialize``
    dequantises no packed weight (no dense temporary: its start-up broadcast skips the frozen base) and
    leaves each rank's own experts as loaded."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from ossforge.model.checkpoint import load_folder

    folder, sizes = _mxfp4_folder(tmp_path_factory, "packed", PACKED_SHAPE, 2 * MIB)
    layers, experts, h, i = (PACKED_SHAPE[k] for k in ("num_hidden_layers", "num_local_experts", "hidden_size",
                                                       "intermediate_size"))
    assert sizes["expert_params"] == layers * experts * (h * 2 * i + i * h)
    adapters = tmp_path / "adapters"
    ranks = _launch(tmp_path, _config(tmp_path, folder, expert_format="mxfp4"),
                    "--runs", "mxfp4:2,bf16:2,mxfp4:1", "--adapters", str(adapters))

    mxfp4_bytes = sizes["expert_params"] * 4.25 / 8  # the whole model's experts, packed
    figures = []
    for r, result in enumerate(ranks):
        mx2, bf2, mx1 = result["mxfp4-ep2"], result["bf16-ep2"], result["mxfp4-ep1"]
        held = mx2["experts"]
        assert (held["local_experts"], held["packed_tensors"]) == (experts // 2, 2 * layers)
        assert held["params"] == sizes["expert_params"] // 2
        # (a) 4.25 bits per parameter of this rank's experts, measured as the storages the parameters keep
        # alive (a view of the whole checkpoint tensor would count all of it), not the whole model's.
        assert abs(held["storage_bytes"] - mxfp4_bytes / 2) <= 0.05 * mxfp4_bytes / 2, held
        assert held["resident_bytes"] == held["storage_bytes"]
        assert mx1["experts"]["storage_bytes"] == 2 * held["storage_bytes"]  # EP=1 holds them all
        assert bf2["experts"]["storage_bytes"] == held["params"] * 4 and bf2["experts"]["packed_tensors"] == 0
        # (b) same steps as the dequantised experts at EP=2 and the packed ones at EP=1.
        assert len(mx2["losses"]) == 2
        for step, (x, y, z) in enumerate(zip(mx2["losses"], bf2["losses"], mx1["losses"])):
            assert abs(x - y) <= 1e-4 * abs(y) and abs(x - z) <= 1e-4 * abs(z), (r, step, x, y, z)
        # deepspeed.initialize: no dense temporary of a packed weight, no rank's experts overwritten, and
        # the rank's memory grows by less than one dense expert weight of one layer.
        one_dense_weight = experts // 2 * h * 2 * i * 4
        for name, run in (("mxfp4-ep2", mx2), ("bf16-ep2", bf2), ("mxfp4-ep1", mx1)):
            assert run["dequantised_in_initialize"] == 0, (r, name)
            assert run["fingerprint_after"] == run["fingerprint_before"], (r, name)
            assert run["initialize_growth"] < one_dense_weight, (r, name, run["initialize_growth"])
        figures.append(f"rank {r}: expert weights held at EP=2: MXFP4 {held['storage_bytes'] / MIB:.3f} MiB "
                       f"({8 * held['storage_bytes'] / held['params']:.3f} bits/param) vs dequantised fp32 "
                       f"{bf2['experts']['storage_bytes'] / MIB:.3f} MiB; EP=1 MXFP4 "
                       f"{mx1['experts']['storage_bytes'] / MIB:.3f} MiB; RSS growth in deepspeed.initialize "
                       f"{mx2['initialize_growth'] / MIB:.2f} MiB (one dense local expert weight "
                       f"{one_dense_weight / MIB:.2f} MiB); peak RSS after load +{mx2['after_load'] / MIB:.1f} MiB "
                       f"(bf16 +{bf2['after_load'] / MIB:.1f} MiB)")
    for name in ("mxfp4-ep2", "bf16-ep2"):  # the two EP ranks hold different experts, the same at EP=1
        assert ranks[0][name]["fingerprint_before"] != ranks[1][name]["fingerprint_before"]
    assert ranks[0]["mxfp4-ep1"]["fingerprint_before"] == ranks[1]["mxfp4-ep1"]["fingerprint_before"]

    # (c) the adapter of the packed EP=2 run: the same file as the dequantised run's (EP=1 layout, all experts),
    # loaded by stock peft on the dequantised base, gives the trained model's logits.
    trained = {name: load_file(adapters / name / "adapter_model.safetensors") for name in ("mxfp4-ep2", "bf16-ep2")}
    assert trained["mxfp4-ep2"].keys() == trained["bf16-ep2"].keys()
    expert_keys = [k for k in trained["mxfp4-ep2"] if ".experts." in k]
    assert expert_keys and all(trained["mxfp4-ep2"][k].shape[0 if "lora_A" in k else 1] == 4 * experts
                               for k in expert_keys)  # r x all 32 experts, as at EP=1
    for key, value in trained["mxfp4-ep2"].items():
        torch.testing.assert_close(value, trained["bf16-ep2"][key], rtol=1e-4, atol=1e-6)
    stock = PeftModel.from_pretrained(load_folder(folder), str(adapters / "mxfp4-ep2")).eval()
    probe = load_file(adapters / "mxfp4-ep2" / "probe.safetensors")
    want = probe["logits"]
    with torch.no_grad():
        got = stock(input_ids=probe["input_ids"]).logits
        with stock.disable_adapter():
            base = stock(input_ids=probe["input_ids"]).logits
    assert float((got - want).norm() / want.norm()) <= 1e-5
    assert float((base - want).norm() / want.norm()) > 1e-3  # the adapter changes the logits
    print("\n".join(figures))
