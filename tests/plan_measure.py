"""Planner vs measured peak host RSS on CPU: a small-but-not-tiny gpt-oss, real trainer, real data.

The model (4 layers, 8 experts, hidden 256, 8 heads, real 201k vocabulary) is small enough for 2 CPU
cores and large enough that eager attention's S^2 scores and the logits dominate at 2048 tokens.
Rows are long multi-turn chats truncated to seq_len, so every micro-batch has seq_len tokens and about
a third of them trained. Used by tests/test_plan.py and, for the BENCHMARKS.md table:

    python -m tests.plan_measure OUT_DIR      # all 8 configs: seq 512/2048 x checkpointing x EP 1/2
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import run_cli

WORDS = "dose weight patient kidney liver tablet infusion hour daily paediatric adult renal clearance".split()


def write_inputs(folder: Path) -> Path:
    """Model folder, data and a base config in ``folder``; returns the config path."""
    from ossforge.model.checkpoint import save_base
    from ossforge.model.presets import build_random

    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "model" / "config.json").is_file():
        model = build_random("tiny", seed=0, num_hidden_layers=4, num_local_experts=8, hidden_size=256,
                             intermediate_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                             sliding_window=128, layer_types=["sliding_attention", "full_attention"] * 2)
        save_base(model, folder / "model")
    rng = random.Random(0)
    with open(folder / "long.jsonl", "w") as f:
        for _ in range(24):
            messages = [{"role": "system", "content": "You answer dosing questions."}]
            for _ in range(24):
                messages.append({"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(90))})
                messages.append({"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(40))})
            f.write(json.dumps({"messages": messages}) + "\n")
    config = {"model": {"path": str(folder / "model")}, "data": {"train": str(folder / "long.jsonl")},
              "lora": {"r": 8, "alpha": 16},
              "training": {"max_steps": 2, "micro_batch_size": 1, "seq_len": 512, "lr": 1e-3},
              "output_dir": str(folder / "run")}
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# What the planner's CPU_PROCESS_GIB stands for: a process with the trainer's imports and the harmony vocabulary.
BASELINE_SCRIPT = """
import torch, transformers, peft, deepspeed
from ossforge.finetune import trainer
from ossforge.finetune.memory import GIB, file_backed_bytes, peak_host_bytes
from ossforge.model.tokenizer import harmony_encoding, text_encoding
harmony_encoding(); text_encoding().encode_ordinary("dose")
print(peak_host_bytes() / GIB, file_backed_bytes() / GIB)
"""


def machine_baseline() -> tuple[float, float]:
    """(peak RSS GiB, file-backed RSS GiB) of that process on this machine.

    The planner's 0.6 GiB was measured on one VM; how much of the shared libraries a process has
    resident (file-backed pages) is a property of the machine, not of the model, so the plan test
    replaces the constant by this machine's figure before comparing the model's terms."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", BASELINE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    return float(out[-2]), float(out[-1])


def run_dir(folder: Path, seq: int, ckpt: bool, ep: int) -> Path:
    """The output_dir of one config's run."""
    return folder / f"run-{seq}-{int(ckpt)}-{ep}"


def measure(folder: Path, seq: int, ckpt: bool, ep: int) -> tuple[float, float]:
    """(planned GiB per rank, measured peak_host_gib) for one config."""
    from ossforge.finetune.config import load_config
    from ossforge.finetune.plan import make_plan

    config_path = write_inputs(folder)
    run = run_dir(folder, seq, ckpt, ep)
    sets = [f"training.seq_len={seq}", f"training.gradient_checkpointing={str(ckpt).lower()}",
            f"parallel.expert_parallel_size={ep}", f"output_dir={run}"]
    plan = make_plan(load_config(config_path, sets, check_files=False), config_path, ep, device="cpu")
    args = ["train", str(config_path), *[a for s in sets for a in ("--set", s)]]
    proc = run_cli(*args, *(["--nproc", str(ep)] if ep > 1 else []), env={"OMP_NUM_THREADS": "1"}, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    return plan.per_gpu_gib, last["peak_host_gib"]


if __name__ == "__main__":
    out = Path(sys.argv[1])
    print("| seq | checkpointing | EP | planned GiB | measured peak_host_gib | plan / measured |")
    print("|---|---|---|---|---|---|")
    for seq in (512, 2048):
        for ckpt in (False, True):
            for ep in (1, 2):
                planned, measured = measure(out, seq, ckpt, ep)
                print(f"| {seq} | {'on' if ckpt else 'off'} | {ep} | {planned:.2f} | {measured:.2f} | "
                      f"{planned / measured:.3f} |", flush=True)
