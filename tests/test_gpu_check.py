"""The GPU check runner: one JSON with every stage, each stage isolated and time-boxed; toy sizes on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ossforge import gpu_check

REPO = Path(__file__).resolve().parents[1]


def test_failing_and_hanging_stages_do_not_stop_the_others(tmp_path):
    out = tmp_path / "check.json"
    py = sys.executable
    plan = [
        gpu_check.Stage("bad_input", 60, [py, "-m", "ossforge", "bench", "train", "--shape", "tiny", "--layers", "9"]),
        gpu_check.Stage("hangs", 2, [py, "-c", "import time; time.sleep(60)"]),
        gpu_check.Stage("crashes", 30, [py, "-c", "import os; os.abort()"]),
        gpu_check.Stage("writes", 30, [py, "-c", "import json, sys; json.dump({'x': 1}, open(sys.argv[1], 'w'))",
                                       "{out}"]),
        gpu_check.Stage("not_here", 30, [py, "-c", "pass"], skip="needs CUDA"),
    ]
    report = gpu_check.run_all(plan, out, total_budget_s=120)
    stages = json.loads(out.read_text())["stages"]
    assert stages == report["stages"]
    assert stages["bad_input"]["status"] == "failed" and stages["bad_input"]["returncode"] == 2
    assert "error: --layers" in stages["bad_input"]["log_tail"]
    assert stages["hangs"]["status"] == "timeout" and stages["hangs"]["seconds"] < 30
    assert stages["crashes"]["status"] == "failed"
    assert stages["writes"] == {**stages["writes"], "status": "ok", "result": {"x": 1}}
    assert stages["not_here"] == {"status": "skipped", "reason": "needs CUDA"}


def test_out_of_time_stages_are_recorded_as_skipped(tmp_path):
    py = sys.executable
    plan = [gpu_check.Stage("slow", 30, [py, "-c", "import time; time.sleep(60)"]),
            gpu_check.Stage("after", 30, [py, "-c", "pass"])]
    report = gpu_check.run_all(plan, tmp_path / "c.json", total_budget_s=6)
    assert report["stages"]["slow"]["status"] == "timeout"
    assert report["stages"]["after"]["status"] == "skipped"


def test_every_stage_is_planned_on_gpu_and_cpu():
    names = [s.name for s in gpu_check.stages(tiny=False)]
    assert names == [s.name for s in gpu_check.stages(tiny=True)]
    for name in ("environment", "main_job", "bench_train_20b", "bench_train_120b", "plan_vs_measured", "bench_moe_20b",
                 "bench_moe_120b", "kernel_tests", "attention_gradcheck", "ep_clipping_bf16",
                 "bench_moe_20b_mxfp4", "bench_moe_120b_mxfp4"):
        assert name in names
    gpu = {s.name: s for s in gpu_check.stages(tiny=False)}
    assert gpu["kernel_tests"].env["TRITON_INTERPRET"] == "0"
    assert "--gpu-mem-gib" in gpu["bench_train_20b"].argv and "4096" in gpu["bench_train_120b"].argv
    assert sum(s.budget_s for s in gpu.values()) >= gpu_check.TOTAL_BUDGET_S  # the total box is what binds


@pytest.mark.slow
def test_tiny_run_on_cpu_writes_every_stage(tmp_path):
    """The real stages at toy sizes: the main job (DeepSpeed train, SIGINT, --resume, peft reload), bench
    train and the planner comparison run; the others are recorded with a reason."""
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "-m", "ossforge.gpu_check", "--tiny", "--out", str(out),
                           "--only", "environment,main_job,bench_train_20b,plan_vs_measured,attention_gradcheck"],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "OSSFORGE_MOE_BACKEND": "torch"})
    report = json.loads(out.read_text())
    stages = report["stages"]
    assert set(stages) == {s.name for s in gpu_check.stages(tiny=True)}
    assert stages["environment"]["status"] == "ok", stages["environment"].get("log_tail")
    assert "deepspeed" in stages["environment"]["result"]["modules"]
    assert stages["main_job"]["status"] == "ok", stages["main_job"].get("log_tail")
    job = stages["main_job"]["result"]
    assert 0 < job["stopped_at_step"] < 6 and job["steps_logged"] == [1, 2, 3, 4, 5, 6]
    assert job["adapter"]["max_logit_change"] > 0 and "adapter_model.safetensors" in job["adapter"]["files"]
    assert stages["bench_train_20b"]["status"] == "ok"
    assert set(stages["bench_train_20b"]["result"]["paths"]) == {"ossforge", "stock"}
    assert stages["plan_vs_measured"]["status"] == "ok"
    assert stages["plan_vs_measured"]["result"]["planned_gib"] > 0
    assert stages["attention_gradcheck"]["status"] == "skipped"
    assert stages["bench_moe_120b"] == {"status": "skipped", "reason": "not selected (--only)"}
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_reduced_model_folder_loads_with_its_depth(tmp_path):
    """The main job's base: a random model of a preset's shapes at reduced depth, read back by ossforge."""
    import torch

    from ossforge.model.checkpoint import load_folder, read_config

    gpu_check._save_reduced_model("tiny", 1, tmp_path / "base", torch.device("cpu"))
    config = read_config(tmp_path / "base")
    assert config.num_hidden_layers == 1 and config.layer_types == ["sliding_attention"]
    assert config.vocab_size == 201088 and config.hidden_size == 64
    model = load_folder(str(tmp_path / "base"), dtype=torch.float32, device="cpu")
    assert len(model.model.layers) == 1


def test_carry_list_pins_one_version_each():
    names = [spec.split("==")[0] for spec in gpu_check.CARRY_WHEELS + gpu_check.CARRY_SDISTS]
    assert len(names) == len(set(names)) and all("==" in s for s in gpu_check.CARRY_WHEELS)
    assert "deepspeed" in names and "openai-harmony" in names and "pydantic-core" in names
