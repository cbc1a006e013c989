"""Expert parallelism: peft-layout sharding, and 2 CPU ranks through the DeepSpeed launcher where EP=2
(fused kernels) must reproduce EP=1 (stock transformers + peft), save the same adapter file, and resume
an EP=2 checkpoint at EP=1."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ossforge.finetune.expert_parallel import _join_b, _slice_b, apply_expert_parallel, gathered_experts

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- single process


def _expert_lora_model(r=2):
    from peft import LoraConfig, get_peft_model

    from ossforge.model.presets import build_random

    model = build_random("tiny", seed=0)
    config = LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, target_modules=["q_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    return get_peft_model(model, config)


def test_slices_follow_peft_expert_layout():
    """Slicing A and B for a rank's experts gives exactly those experts' peft delta weights."""
    model = _expert_lora_model()
    wrapper = model.base_model.model.model.layers[0].mlp.experts  # ParamWrapper(down_proj)
    full = wrapper.get_delta_weight("default")  # [E, in, out] or [E, out, in]
    a, b = wrapper.lora_A["default"].weight.detach(), wrapper.lora_B["default"].weight.detach()
    experts, ep = 8, 4
    for rank in range(ep):
        n = a.shape[0] // ep
        a_local, b_local = a[rank * n:(rank + 1) * n], _slice_b(b, experts, rank, ep)
        wrapper.num_experts = experts // ep
        with torch.no_grad():
            wrapper.lora_A["default"].weight.data = a_local
            wrapper.lora_B["default"].weight.data = b_local
        local = wrapper.get_delta_weight("default")
        wrapper.num_experts = experts
        with torch.no_grad():
            wrapper.lora_A["default"].weight.data, wrapper.lora_B["default"].weight.data = a, b
        torch.testing.assert_close(local, full[rank * 2:(rank + 1) * 2], rtol=0, atol=0)
    parts = [_slice_b(b, experts, rank, ep) for rank in range(ep)]
    assert torch.equal(_join_b(parts, experts), b)


def test_ep1_is_a_no_op_and_ep2_needs_distributed():
    model = _expert_lora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_expert_parallel(model, 1) is model
    with gathered_experts(model):
        pass
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(RuntimeError, match="torch.distributed"):
        apply_expert_parallel(model, 2)


# ----------------------------------------------------------------------------- 2 ranks, launcher


def _launch(out: Path, *worker_args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(_free_port()), "tests/ep_worker.py", "--out", str(out), *worker_args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _results(out: Path) -> dict[int, dict]:
    return {r: json.loads((out / f"losses_rank{r}.json").read_text()) for r in (0, 1)}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _header(path: Path) -> bytes:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return raw[8:8 + size]


def _assert_losses_close(a: dict, b: dict, steps):
    for step in steps:
        x, y = a[str(step)], b[str(step)]
        assert abs(x - y) <= 1e-4 * abs(y), (step, x, y)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ep2_matches_ep1_and_resumes_at_ep1(tmp_path):
    from safetensors.torch import load_file

    # Layer 0: experts 4-7 (all of rank 1's at EP=2) get no token; layer 1: expert 7 gets none.
    # One launch runs EP=1 (stock path), EP=2 (fused kernels) and EP=1 resuming EP=2's step-2 checkpoint.
    _launch(tmp_path, "--suite", "--dead-experts", "4,5,6,7;7", "--steps", "3", "--save-at", "2")
    ep1, ep2, resumed = (_results(tmp_path / name) for name in ("ep1", "ep2", "resumed"))
    assert [ep1[r]["local_experts"] for r in (0, 1)] == [8, 8]
    assert [ep2[r]["local_experts"] for r in (0, 1)] == [4, 4]
    for rank in (0, 1):
        _assert_losses_close(ep2[rank]["losses"], ep1[rank]["losses"], range(3))

    for tag in ("step2", "final"):
        f1 = tmp_path / "ep1" / tag / "adapter" / "adapter_model.safetensors"
        f2 = tmp_path / "ep2" / tag / "adapter" / "adapter_model.safetensors"
        assert _header(f1) == _header(f2)  # same names, dtypes, shapes, offsets
        a, b = load_file(f1), load_file(f2)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-4)
        experts = [k for k in a if "mlp.experts" in k]
        assert experts and all(a[k].shape[0] * a[k].shape[1] > 0 for k in experts)
    step2 = load_file(tmp_path / "ep1" / "step2" / "adapter" / "adapter_model.safetensors")
    final = load_file(tmp_path / "ep1" / "final" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(step2[k], final[k]) for k in step2 if "mlp.experts" in k)

    # Resume EP=2's step-2 checkpoint (adapter + gathered Adam moments) at EP=1: step 2 as if uninterrupted.
    for rank in (0, 1):
        assert list(resumed[rank]["losses"]) == ["2"]
        _assert_losses_close(resumed[rank]["losses"], ep2[rank]["losses"], [2])
    a = load_file(tmp_path / "resumed" / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ep2" / "final" / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- the trainer, via ossforge train


@pytest.mark.multiprocess
@pytest.mark.slow
def test_train_cli_ep2_checkpoint_resumes_at_ep1(tmp_path):
    """`ossforge train --nproc 2` at EP=2, then `--resume` of its step-2 checkpoint at EP=1 repeats step 3."""
    import shutil

    import yaml
    from safetensors.torch import load_file

    from tests.conftest import run_cli

    cfg = tmp_path / "ep.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"preset": "tiny"}, "data": {"train": str(REPO / "data" / "medicine" / "train.jsonl")},
        "lora": {"r": 4, "alpha": 8},
        "training": {"max_steps": 3, "save_every": 2, "micro_batch_size": 1, "seq_len": 512, "lr": 1e-3},
        "parallel": {"expert_parallel_size": 2}, "output_dir": str(tmp_path / "ep2")}))
    env = {"OMP_NUM_THREADS": "1"}
    proc = run_cli("train", str(cfg), "--nproc", "2", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_rank = int(re.search(r"LoRA .*?: ([\d,]+) trainable", proc.stdout).group(1).replace(",", ""))
    total = int(re.search(r"trainable +([\d,]+) in total across the 2 EP ranks", proc.stdout).group(1).replace(",", ""))
    assert per_rank < total < 2 * per_rank  # expert LoRA sharded, attention LoRA replicated
    first = [json.loads(line) for line in (tmp_path / "ep2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in first] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "ep2" / "checkpoints" / "step-2").iterdir()) == \
        ["mp_rank_00_model_states.pt"]  # an EP=1-shaped checkpoint: no per-EP-rank files

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ep2", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-3")
    (resumed / "checkpoints" / "latest").write_text("step-2")
    proc = run_cli("train", str(cfg), "--nproc", "2", "--resume", "--set", "parallel.expert_parallel_size=1",
                   "--set", f"output_dir={resumed}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ep1_trainable = int(re.search(r"LoRA .*?: ([\d,]+) trainable", proc.stdout).group(1).replace(",", ""))
    assert ep1_trainable == total  # the EP=2 total is what one EP=1 rank trains
    again = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [1, 2, 3]
    assert abs(again[2]["loss"] - first[2]["loss"]) <= 1e-4 * abs(first[2]["loss"])
    a = tmp_path / "ep2" / "adapter" / "adapter_model.safetensors"
    b = resumed / "adapter" / "adapter_model.safetensors"
    assert _header(a) == _header(b)
    wa, wb = load_file(a), load_file(b)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=1e-4)


def test_train_without_launcher_rejects_ep2(tmp_path):
    import yaml

    from tests.conftest import run_cli

    cfg = tmp_path / "ep.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"preset": "tiny"},
                                   "data": {"train": str(REPO / "data" / "medicine" / "train.jsonl")},
                                   "parallel": {"expert_parallel_size": 2}, "output_dir": str(tmp_path / "run")}))
    proc = run_cli("train", str(cfg))
    assert proc.returncode == 2
    assert "parallel.expert_parallel_size: 2 does not divide the world size 1" in proc.stderr
    assert not (tmp_path / "run").exists()
