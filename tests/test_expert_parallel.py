"""Expert parallelism: peft-layout sharding, and 2 CPU ranks through the DeepSpeed launcher where EP=2
(fused kernels) must reproduce EP=1 (stock transformers + peft) with every step clipped, on the fp32/bf16
x ZeRO-0/ZeRO-2 engine paths, save the same adapter file, resume an EP=2 checkpoint at EP=2 and EP=1,
and keep one step's host syncs bounded; then the same through `ossforge train --nproc 2`."""

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
    import torch.distributed as dist

    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="torch.distributed"):
            apply_expert_parallel(model, 2)
    else:  # an earlier in-process test left a 1-rank world
        with pytest.raises(ValueError, match="does not divide the world size 1"):
            apply_expert_parallel(model, 2)


# ----------------------------------------------------------------------------- 2 ranks, launcher


def _launch(out: Path, *worker_args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(_free_port()), "tests/ep_worker.py", "--out", str(out), *worker_args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _header(path: Path) -> bytes:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return raw[8:8 + size]


def _run_results(run: Path) -> dict[int, dict]:
    return {r: json.loads((run / f"result_rank{r}.json").read_text()) for r in (0, 1)}


def _rel_frobenius(a: dict, b: dict, keys=None) -> float:
    keys = list(b) if keys is None else keys
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in keys)
    return float(num.sqrt() / sum((b[k].double() ** 2).sum() for k in keys).sqrt())


def _rel(x: float, y: float) -> float:
    return abs(x - y) / abs(y)


# (path, DeepSpeed optimizer wrapper, adapter tolerance). bf16 adapters are stored in bf16, whose
# resolution (2^-8 = 3.9e-3 relative) is above 1e-3: there the clipping rule is checked on the step-0
# gradient norm (same weights at EP=1 and EP=2) and the losses, and the adapters within 1e-2.
PATHS = [("fp32-z0", "AdamW", 1e-3), ("fp32-z2", "DeepSpeedZeroOptimizer", 1e-3),
         ("bf16-z0", "FP16_UnfusedOptimizer", 1e-2), ("bf16-z2", "DeepSpeedZeroOptimizer", 1e-2)]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ep2_matches_ep1_with_clipping_on_every_engine_path(tmp_path):
    """One launch: for fp32/bf16 x ZeRO-0/ZeRO-2, EP=1 (stock path) and EP=2 (fused in fp32) train the
    same with every step clipped; ZeRO-0's EP=2 step-2 checkpoint resumes at EP=2 and at EP=1 as if
    unbroken; one step's host syncs are bounded."""
    # Layer 0: experts 4-7 (all of rank 1's at EP=2) get no token; layer 1: expert 7 gets none.
    _launch(tmp_path, "--paths", ",".join(p for p, _, _ in PATHS), "--steps", "3", "--save-at", "2",
            "--grad-accum", "2", "--dead-experts", "4,5,6,7;7")
    check_suite(tmp_path)


def suite_figures(out: Path, paths=PATHS) -> dict:
    """EP=2 vs EP=1 (and resumed vs unbroken) differences of an ``ep_worker.py`` output, per path."""
    from safetensors.torch import load_file

    figures = {}
    for path, _, _ in paths:
        base = out / path
        if not (base / "ep1").is_dir():
            continue
        runs = {r.name: _run_results(r) for r in sorted(base.iterdir()) if r.is_dir()}
        ep1, ep2 = runs["ep1"], runs["ep2"]
        w1 = load_file(base / "ep1" / "adapter-3" / "adapter_model.safetensors")
        w2 = load_file(base / "ep2" / "adapter-3" / "adapter_model.safetensors")
        fig = {"optimizer": ep2[0]["optimizer"],
               "max_rel_loss_ep2_vs_ep1": max(_rel(ep2[r]["losses"][s], ep1[r]["losses"][s])
                                              for r in (0, 1) for s in ep1[r]["losses"]),
               "rel_grad_norm_step0_ep2_vs_ep1": _rel(ep2[0]["grad_norms"]["0"], ep1[0]["grad_norms"]["0"]),
               "min_grad_norm_over_max_grad_norm": min(v for r in (0, 1) for v in ep1[r]["grad_norms"].values()) / 0.05,
               "adapter_rel_frobenius_ep2_vs_ep1": _rel_frobenius(w2, w1),
               "host_syncs_one_step_ep1": ep1[0]["host_syncs"], "host_syncs_one_step_ep2": ep2[0]["host_syncs"]}
        for resumed in ("ep2-to-ep2", "ep2-to-ep1"):
            if resumed in runs:
                w = load_file(base / resumed / "adapter-3" / "adapter_model.safetensors")
                fig[f"{resumed}_rel_loss_vs_unbroken"] = max(_rel(runs[resumed][r]["losses"]["2"], ep2[r]["losses"]["2"])
                                                            for r in (0, 1))
                fig[f"{resumed}_adapter_rel_frobenius_vs_unbroken"] = _rel_frobenius(w, w2)
        figures[path] = fig
    return figures


def check_suite(out: Path, paths=PATHS) -> None:
    """The assertions on an ``ep_worker.py`` output folder (also for a GPU run's)."""
    from safetensors.torch import load_file

    layers, micro_batches = 2, 2
    for path, wrapper, adapter_tol in paths:
        base = out / path
        ep1, ep2 = _run_results(base / "ep1"), _run_results(base / "ep2")
        for rank in (0, 1):
            a, b = ep2[rank], ep1[rank]
            assert (a["optimizer"], b["optimizer"]) == (wrapper, wrapper), path
            assert (a["local_experts"], b["local_experts"]) == (4, 8)
            for step in ("0", "1", "2"):
                assert _rel(a["losses"][step], b["losses"][step]) <= 1e-4, (path, rank, step)
                assert b["grad_norms"][step] > 5 * 0.05 and a["grad_norms"][step] > 5 * 0.05  # clipped
                assert a["grad_norms"][step] == ep2[1 - rank]["grad_norms"][step]  # one norm for all ranks
            # Same weights at step 0: the global norm is the EP=1 norm (a rule leaving out or averaging
            # the expert shards would differ by far more).
            assert _rel(a["grad_norms"]["0"], b["grad_norms"]["0"]) <= 1e-4, path
            if path.startswith("fp32"):
                for step in ("1", "2"):
                    assert _rel(a["grad_norms"][step], b["grad_norms"][step]) <= 1e-4, (path, step)
                assert a["expert_load"] == b["expert_load"]  # summed over ranks at read time
            # Host reads in one step (grad_accum 2): at EP=1 only the CPU data order (Batches' randperm,
            # no device involved); at EP=2 also the dispatch's one split-size read per layer and forward.
            dispatch = {s: n for s, n in a["host_syncs"]["our_sites"].items() if "expert_parallel.py" in s}
            assert sum(dispatch.values()) == layers * micro_batches and len(dispatch) == 1, a["host_syncs"]
            assert b["host_syncs"]["ours"] <= 1, b["host_syncs"]
            assert {s.split(":")[0].rsplit("/", 1)[1] for s in b["host_syncs"]["our_sites"]} <= {"trainer.py"}
        w1 = load_file(base / "ep1" / "adapter-3" / "adapter_model.safetensors")
        w2 = load_file(base / "ep2" / "adapter-3" / "adapter_model.safetensors")
        assert _header(base / "ep1" / "adapter-3" / "adapter_model.safetensors") == \
            _header(base / "ep2" / "adapter-3" / "adapter_model.safetensors")  # same file layout
        experts = [k for k in w1 if "mlp.experts" in k]
        assert experts and _rel_frobenius(w2, w1) <= adapter_tol and _rel_frobenius(w2, w1, experts) <= adapter_tol
        step2 = load_file(base / "ep1" / "adapter-2" / "adapter_model.safetensors")
        assert _rel_frobenius(step2, w1, experts) > 3 * adapter_tol  # the last step moved the experts

        if not path.endswith("z0"):
            continue
        # Resume EP=2's step-2 checkpoint (adapter, optimizer state incl. expert moments and fp32
        # masters) at EP=2 and at EP=1: step 3 as if uninterrupted.
        for resumed in ("ep2-to-ep2", "ep2-to-ep1"):
            again = _run_results(base / resumed)
            for rank in (0, 1):
                assert list(again[rank]["losses"]) == ["2"]
                assert _rel(again[rank]["losses"]["2"], ep2[rank]["losses"]["2"]) <= 1e-5, (path, resumed)
                assert _rel(again[rank]["grad_norms"]["2"], ep2[rank]["grad_norms"]["2"]) <= 1e-4, (path, resumed)
            w = load_file(base / resumed / "adapter-3" / "adapter_model.safetensors")
            # Same EP: bit-identical. EP=1: one step's reduction order differs (within bf16's resolution).
            tol = 1e-6 if resumed == "ep2-to-ep2" else (1e-5 if path.startswith("fp32") else 2e-3)
            assert _rel_frobenius(w, w2) <= tol and _rel_frobenius(w, w2, experts) <= tol, (path, resumed)


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
