"""Interop: adapters trained here work in stock transformers + peft, and stock peft adapters train here.

One short training run (tiny preset, 3 steps, CPU) is shared by the tests of this module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_cli, stock_peft_lora

pytestmark = pytest.mark.slow


def _config(tmp: Path, name: str, steps: int, extra: str = "") -> Path:
    data = tmp / "train.jsonl"
    if not data.exists():
        data.write_text("".join(open(REPO / "data/medicine/train.jsonl").readlines()[:8]))
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(
        f"model: {{preset: tiny}}\ndata: {{train: {data}}}\nlora: {{r: 4, alpha: 8{extra}}}\n"
        f"training: {{max_steps: {steps}, lr: 1.0e-2, micro_batch_size: 2, seq_len: 512, seed: 0}}\n"
        f"output_dir: {tmp / name}\n")
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("interop")
    proc = run_cli("train", str(_config(tmp, "run", 3)), env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return tmp / "run"


def _probe():
    from ossforge.finetune.harmony import render_row

    row = json.loads(open(REPO / "data/medicine/heldout.jsonl").readline())
    return torch.tensor([render_row(row)[0][:96]])


def _stock(run: Path):
    """Stock transformers + peft, nothing from ossforge."""
    from peft import PeftModel
    from transformers import GptOssForCausalLM

    base = GptOssForCausalLM.from_pretrained(str(run / "base"), torch_dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(run / "adapter")).eval()


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_expert_lora_is_trained(trained):
    """The silent failure seen elsewhere: expert LoRA B stays zero. Here every B moved."""
    from safetensors.torch import load_file

    weights = load_file(str(trained / "adapter" / "adapter_model.safetensors"))
    experts_b = {k: v for k, v in weights.items() if "experts" in k and "lora_B" in k}
    attention_b = {k: v for k, v in weights.items() if "self_attn" in k and "lora_B" in k}
    assert len(experts_b) == 2 * 2  # 2 layers x (gate_up_proj, down_proj)
    assert attention_b
    for name, tensor in {**experts_b, **attention_b}.items():
        assert tensor.abs().max() > 0, f"{name} is still zero after training"


def test_stock_peft_gives_ossforge_logits(trained):
    """Stock transformers + peft on the saved base/adapter == ossforge's serving model (fused MoE)."""
    from ossforge.agents.backends import TransformersBackend

    ids = _probe()
    with torch.no_grad():
        stock = _stock(trained)(ids).logits
        ours = TransformersBackend.from_paths(adapter_dir=trained / "adapter").model(ids).logits
    assert _rel(ours, stock) <= 1e-4
    # and the adapter changes the model: the comparison above is not base-vs-base
    from transformers import GptOssForCausalLM

    with torch.no_grad():
        base = GptOssForCausalLM.from_pretrained(str(trained / "base"), torch_dtype=torch.float32).eval()(ids).logits
    assert _rel(base, stock) > 1e-4


def test_merged_checkpoint_gives_adapter_logits(trained, tmp_path):
    from transformers import GptOssForCausalLM

    proc = run_cli("merge", "--adapter", str(trained / "adapter"), "--out", str(tmp_path / "merged"),
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = _probe()
    with torch.no_grad():
        merged = GptOssForCausalLM.from_pretrained(str(tmp_path / "merged"), torch_dtype=torch.float32).eval()(ids).logits
        stock = _stock(trained)(ids).logits
    assert _rel(merged, stock) <= 1e-3


def _stock_adapter(run: Path, out: Path) -> dict:
    """An adapter made with stock peft (target_parameters for the experts), B set non-zero."""
    from transformers import GptOssForCausalLM

    base = GptOssForCausalLM.from_pretrained(str(run / "base"), torch_dtype=torch.float32)
    model = stock_peft_lora(base, seed=1, scale=0.01)
    model.save_pretrained(str(out))
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_stock_peft_adapter_warm_starts_training_here(trained, tmp_path):
    """A stock-peft adapter starts ossforge training through lora.init_adapter and keeps training there."""
    from safetensors.torch import load_file

    _stock_adapter(trained, tmp_path / "stock")
    cfg = _config(tmp_path, "warm", 2, extra=", init_adapter: stock")  # relative to the config file
    proc = run_cli("train", str(cfg), env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"warm start {tmp_path / 'stock'}" in proc.stdout
    after = load_file(str(tmp_path / "warm" / "adapter" / "adapter_model.safetensors"))
    before = load_file(str(tmp_path / "stock" / "adapter_model.safetensors"))
    assert set(after) == set(before)
    for k in before:  # started from the stock weights (close), and trained (not equal)
        assert not torch.equal(after[k], before[k]) and _rel(after[k], before[k]) < 1.0


def test_report_from_a_real_run(trained):
    """write_report reads the trainer's metrics.jsonl (loss, lr, expert_load) as written."""
    from ossforge.finetune.report import expert_load, write_report
    from ossforge.finetune.run_dir import RunDir

    html = write_report(trained)
    steps, loads = expert_load(RunDir(trained).read_metrics())
    assert steps == [1, 2, 3] and len(loads[0]) == 2 and len(loads[0][0]) == 8  # tiny: 2 layers x 8 experts
    assert abs(sum(loads[0][0]) - 1) < 1e-3
    for name in ("loss.png", "expert_load.png"):
        assert (trained / name).stat().st_size > 1000 and name in html.read_text()


def test_eval_scores_base_and_adapter_of_a_run(trained, tmp_path):
    """`ossforge eval --adapter` loads the run's base/ and the adapter; the adapter changes the loss."""
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"model: {{preset: tiny}}\ndata: {{train: {REPO / 'data/medicine/heldout.jsonl'}, "
                   f"eval: {REPO / 'data/medicine/heldout.jsonl'}}}\ntraining: {{seq_len: 512}}\n"
                   f"output_dir: {tmp_path / 'unused'}\n")
    proc = run_cli("eval", str(cfg), "--adapter", str(trained / "adapter"), "--limit", "2",
                   "--max-new-tokens", "4", "--out", str(tmp_path / "out"), env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["base_model"] == str(trained / "base")
    assert report["base"]["eval_loss"] != report["tuned"]["eval_loss"]
    assert set(report["delta_points"]) >= {"tool_call_accuracy", "well_formed_calls"}
    assert "tool_call_accuracy" in proc.stderr  # the table
    assert (tmp_path / "out" / "eval.png").is_file()
