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
                 "bench_moe_20b_mxfp4", "bench_moe_120b_mxfp4", "mxfp4_peak_20b", "mxfp4_peak_120b"):
        assert name in names
    # the 20b MXFP4 peak (the 24 GB-card target) right after the planner comparison, the 120b one last
    assert names.index("mxfp4_peak_20b") == names.index("plan_vs_measured") + 1 and names[-1] == "mxfp4_peak_120b"
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


@pytest.mark.slow
def test_tiny_mxfp4_peak_stage_trains_two_depths_and_extrapolates(tmp_path):
    """The MXFP4 peak stage at toy size: two MXFP4 folders (published layout), ``ossforge train`` on each at
    seq_len-filling data, the experts held at 4.25 bits, the peaks extrapolated per layer beside the plan."""
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "-m", "ossforge.gpu_check", "--tiny", "--out", str(out),
                           "--only", "mxfp4_peak_20b"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OSSFORGE_MOE_BACKEND": "torch"})
    stage = json.loads(out.read_text())["stages"]["mxfp4_peak_20b"]
    assert stage["status"] == "ok", stage.get("log_tail")
    r = stage["result"]
    assert r["depths"] == [2, 4] and r["full_layers"] == 24 and r["measured"] == "peak_host_gib"
    assert r["settings"]["model"]["expert_format"] == "mxfp4" and r["settings"]["training"]["gradient_checkpointing"]
    assert r["data"]["example_tokens"] == [r["settings"]["training"]["seq_len"]] * 4  # every example fills seq_len
    experts = r["resident_experts"]
    assert experts["mxfp4_resident"] and experts["auto_expert_format"] == "bf16"  # auto is mxfp4 on CUDA only
    assert abs(experts["bits_per_expert_param"] - 4.25) <= 0.05 * 4.25
    peaks = {}
    for layers in ("2", "4"):
        run = r["runs"][layers]
        assert run["returncode"] == 0 and run["steps"] == [1, 2, 3], run
        assert all(loss > 0 for loss in run["losses"]) and run["peak_host_gib"] > 0.1
        peaks[int(layers)] = run["peak_host_gib"]
    fit = r["extrapolated"]
    assert fit["per_layer_gib"] == pytest.approx((peaks[4] - peaks[2]) / 2, abs=1e-3)
    assert r["extrapolated_peak_gib"] == pytest.approx(fit["fixed_gib"] + 24 * fit["per_layer_gib"], abs=2e-3)
    plan = r["plan"]
    assert set(plan) == {"2", "4", "full"} and plan["full"]["expert_format"] == "mxfp4"
    assert plan["full"]["lora_gib"] > plan["4"]["lora_gib"] > plan["2"]["lora_gib"]  # LoRA on every layer
    assert r["planned_gib"] == plan["full"]["per_gpu_gib"]
    assert r["plan_over_measured"] == pytest.approx(r["planned_gib"] / r["extrapolated_peak_gib"], abs=2e-3)
    assert r["fits_target"] == (r["extrapolated_peak_gib"] <= 20.0)
    assert set(r["at_measured_depths"]) == {"2", "4"}
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mxfp4_peak_plans_and_data_at_the_real_shapes(tmp_path):
    """What the GPU stage compares with, at the real shapes (the planner reads no weights): data whose every
    example fills 4096 tokens, the plan at the measured depths and at 24 / 36 layers, ZeRO-Offload for 120b."""
    data = tmp_path / "long.jsonl"
    gpu_check._long_conversations(REPO / "data/medicine/train.jsonl", 4096, 4, data)
    assert gpu_check._examples_at(data, 4096)["example_tokens"] == [4096] * 4
    config = gpu_check._peak_config(tmp_path, 2, tmp_path / "base-2", data, 4096, "bf16")
    p20 = gpu_check._peak_plans(config, "gpt-oss-20b", (2, 4), 24, "cuda", 20.0, offload=False)
    assert set(p20) == {"2", "4", "full"}
    assert abs(p20["full"]["weights_expert_gib"] - 9.46) < 0.02 and p20["full"]["expert_format"] == "mxfp4"
    per_layer = (p20["4"]["per_gpu_gib"] - p20["2"]["per_gpu_gib"]) / 2
    assert 0.4 < per_layer < 0.8  # 0.40 GiB MXFP4 experts + LoRA, its optimizer state, a layer input
    assert p20["full"]["per_gpu_gib"] == pytest.approx(p20["2"]["per_gpu_gib"] + 22 * per_layer, abs=0.1)
    p120 = gpu_check._peak_plans(config, "gpt-oss-120b", (2, 4), 36, "cuda", 80.0, offload=True)
    assert p120["full_offload"]["fits"] and not p120["full"]["fits"]
    assert p120["full_offload"]["optimizer_gib"] == 0 and p120["full_offload"]["host_optimizer_gib"] > 15

    # Peaks as a GPU would measure them (the plan's own, less its overhead): the extrapolation recovers the plan.
    peaks = {n: p120[str(n)]["per_gpu_gib"] - p120[str(n)]["overhead_gib"] for n in (2, 4)}
    figures = gpu_check.compare_with_plan(peaks, 36, p120, 80.0)
    assert figures["extrapolated"]["per_layer_gib"] == pytest.approx((peaks[4] - peaks[2]) / 2, abs=1e-4)
    assert figures["plan_without_overhead_over_measured"] == pytest.approx(1.0, abs=0.01) and figures["within_15pct"]
    offload = figures["offload"]
    assert offload["moved_to_host_gib"] == pytest.approx(p120["full"]["per_gpu_gib"] - offload["planned_gib"])
    assert offload["extrapolated_peak_gib"] == pytest.approx(figures["extrapolated_peak_gib"] - offload["moved_to_host_gib"])
    assert figures["fits_target"] == (offload["extrapolated_peak_gib"] <= 80.0)
    doubled = gpu_check.compare_with_plan({n: 2 * v for n, v in peaks.items()}, 36, p120, 80.0)
    assert not doubled["within_15pct"] and not doubled["fits_target"]
