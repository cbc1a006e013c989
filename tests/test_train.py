"""The DeepSpeed LoRA trainer on CPU: run-directory contract, stock-peft adapter, exact resume,
atomic adapter saves, Ctrl-C, and config errors (exit 2, nothing written)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO, run_cli

DATA = REPO / "tests" / "fixtures" / "train" / "dosing_small.jsonl"
STEPS = 6


def write_config(folder: Path, name: str = "run", **training) -> Path:
    cfg = {
        "model": {"preset": "tiny"},
        "data": {"train": str(DATA), "eval": str(DATA)},
        "lora": {"r": 4, "alpha": 8},
        "training": {"max_steps": STEPS, "lr": 5e-3, "micro_batch_size": 2, "grad_accum": 2, "seq_len": 96,
                     "warmup_steps": 2, "lr_scheduler": "cosine", "seed": 3, **training},
        "output_dir": str(folder / name),
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_in_process(config_path: Path, resume: bool = False, stop_after=None, overrides=()):
    from ossforge.finetune.config import load_config
    from ossforge.finetune.trainer import train

    return train(load_config(config_path, list(overrides)), resume=resume, config_path=str(config_path),
                 stop_after=stop_after)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One 6-step run, shared by the contract tests and the resume comparison."""
    folder = tmp_path_factory.mktemp("straight")
    result = train_in_process(write_config(folder))
    return result


def test_run_directory_contract(straight):
    run = straight.run_dir
    assert straight.steps == STEPS and not straight.interrupted
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["training"]["max_steps"] == STEPS and saved["lora"]["r"] == 4
    assert Path(saved["data"]["train"]).is_absolute()

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        assert {"step", "loss", "lr", "tokens_per_s", "expert_load"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["lr"] > 0
        assert len(r["expert_load"]) == 2 and all(len(layer) == 8 for layer in r["expert_load"])
        assert all(abs(sum(layer) - 1) < 1e-3 for layer in r["expert_load"])
        assert r["memory"]["host_gib"] == [r["peak_host_gib"]] and r["peak_device_gib"] is None  # CPU, 1 rank
        assert 0.2 < r["peak_host_gib"] < 16
    assert "eval_loss" in records[-1]
    assert records[-1]["loss"] < records[0]["loss"], "a few steps at lr 5e-3 must lower the loss"
    # warmup then cosine decay
    lrs = [r["lr"] for r in records]
    assert lrs[0] < lrs[1] and lrs[2] > lrs[-1]

    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "base" / "config.json").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS}"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "expert_load.png").read_bytes()[:4] == b"\x89PNG"
    assert 'src="loss.png"' in (run / "report.html").read_text()
    assert not [p for p in run.iterdir() if p.name.startswith(".")], "no temp files left behind"


def test_adapter_loads_in_stock_peft(straight):
    from peft import PeftModel
    from transformers import GptOssForCausalLM

    adapter = straight.run_dir / "adapter"
    tensors = load_file(adapter / "adapter_model.safetensors")
    attention = [k for k in tensors if "self_attn" in k]
    experts = [k for k in tensors if "mlp.experts" in k]
    assert attention and experts
    assert any("experts.base_layer.lora_B" in k for k in experts)  # gate_up_proj
    assert any(k.endswith("experts.lora_B.weight") for k in experts)  # down_proj
    assert all(tensors[k].abs().sum() > 0 for k in experts if "lora_B" in k), "expert LoRA was trained"

    config = json.loads((adapter / "adapter_config.json").read_text())
    base = GptOssForCausalLM.from_pretrained(config["base_model_name_or_path"])
    ids = torch.tensor([[200006, 17360, 200008, 3575, 553, 261, 10297, 200007]])
    plain = base(input_ids=ids).logits.detach()
    model = PeftModel.from_pretrained(base, str(adapter))
    loaded = dict(model.named_parameters())
    for key, value in tensors.items():
        name = key.replace(".weight", ".default.weight")
        assert torch.equal(loaded[name].detach(), value), key
    assert not torch.allclose(model(input_ids=ids).logits, plain, atol=1e-5)


def test_resume_matches_straight_run(straight, tmp_path):
    config = write_config(tmp_path, "resumed")
    first = train_in_process(config, stop_after=3)
    assert first.interrupted and first.steps == 3
    assert (tmp_path / "resumed" / "checkpoints" / "latest").read_text().strip() == "step-3"
    second = train_in_process(config, resume=True)
    assert second.steps == STEPS and not second.interrupted

    want = load_file(straight.run_dir / "adapter" / "adapter_model.safetensors")
    got = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0, msg=key)
    adapter_config = json.loads((tmp_path / "resumed" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((tmp_path / "resumed" / "base").resolve())
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    straight_losses = [json.loads(line)["loss"] for line in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed_losses = [json.loads(line)["loss"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert resumed_losses == pytest.approx(straight_losses, abs=1e-5)


@pytest.fixture(scope="module")
def stock_adapter(tmp_path_factory) -> Path:
    """A stock-peft adapter folder (r=4, alpha=8 like write_config) with non-zero B, on the tiny preset."""
    from ossforge.model.presets import build_random
    from tests.conftest import stock_peft_lora

    folder = tmp_path_factory.mktemp("stock") / "adapter"
    stock_peft_lora(build_random("tiny", seed=0), seed=1, scale=0.01).save_pretrained(str(folder))
    return folder


def test_warm_start_loads_the_adapter_and_resume_skips_it(stock_adapter, tmp_path, monkeypatch, capsys):
    from ossforge.finetune import trainer

    calls = []
    real_load = trainer.load_init_adapter
    monkeypatch.setattr(trainer, "load_init_adapter", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    config = write_config(tmp_path, "warm", max_steps=2)
    warm = [f"lora.init_adapter={stock_adapter}"]
    first = train_in_process(config, stop_after=1, overrides=warm)
    assert first.steps == 1 and len(calls) == 1
    assert f"  warm start {stock_adapter}\n" in capsys.readouterr().out
    # one AdamW step from the stock weights moves each element by at most the step's lr (5e-3 x warmup 1/3)
    before = load_file(stock_adapter / "adapter_model.safetensors")
    after = load_file(tmp_path / "warm" / "adapter" / "adapter_model.safetensors")
    assert after.keys() == before.keys()
    for key in before:
        assert (after[key] - before[key]).abs().max() < 2e-3, key
    assert not all(torch.equal(after[key], before[key]) for key in before), "it trained"
    assert yaml.safe_load((tmp_path / "warm" / "config.yaml").read_text())["lora"]["init_adapter"] == str(stock_adapter)

    second = train_in_process(config, resume=True, overrides=warm)
    assert second.steps == 2 and len(calls) == 1, "the checkpoint wins on resume: no second warm start"
    out = capsys.readouterr().out
    assert "  warm start skipped: resuming from checkpoint step-1 (lora.init_adapter not loaded)\n" in out


def test_warm_start_from_an_ossforge_adapter_restores_every_lora_tensor(tmp_path):
    """A previous run's adapter/ (here: lm_head among the targets, experts of one layer) loads exactly."""
    from ossforge.finetune.config import LoraConfig
    from ossforge.finetune.lora import apply_lora, load_init_adapter
    from ossforge.finetune.run_dir import save_adapter
    from ossforge.model.presets import build_random

    lora = LoraConfig(r=2, alpha=4, targets=["q_proj", "lm_head"], expert_layers=[1],
                      init_adapter=str(tmp_path / "adapter"))
    previous = apply_lora(build_random("tiny", seed=0), lora)
    with torch.no_grad():
        for p in previous.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    save_adapter(previous, tmp_path / "adapter")
    want = {k: v for k, v in previous.state_dict().items() if "lora_" in k}

    torch.manual_seed(1)
    fresh = apply_lora(build_random("tiny", seed=0), lora)
    assert load_init_adapter(fresh, lora) == len(want)
    got = {k: v for k, v in fresh.state_dict().items() if "lora_" in k}
    assert got.keys() == want.keys() and any("lm_head" in k for k in got)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def _adapter_copy(stock_adapter: Path, folder: Path, edit) -> Path:
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(stock_adapter, folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def _drop_one(t):
    del t[sorted(k for k in t if "experts" in k)[0]]


def _extra_layer(t):
    t["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 8)


def _base_weight(t):
    t["base_model.model.model.embed_tokens.weight"] = torch.zeros(2, 2)


def _wrong_shape(t):
    key = sorted(k for k in t if "q_proj.lora_A" in k)[0]
    t[key] = torch.zeros(t[key].shape[0], t[key].shape[1] + 1)


@pytest.mark.parametrize("edit, reason", [
    (_drop_one, "has no weights for 1 LoRA tensor(s) of this model, e.g. base_model.model.model.layers.0.mlp.experts"),
    (_extra_layer, "holds 1 LoRA tensor(s) this model does not have, e.g. base_model.model.model.layers.7"),
    (_base_weight, "holds 1 non-LoRA tensor(s), e.g. base_model.model.model.embed_tokens.weight"),
    (_wrong_shape, "does not fit this model: size mismatch for base_model.model.model.layers.0.self_attn.q_proj"),
])
def test_warm_start_weights_must_match_the_lora_tensors_exactly(tiny_model, stock_adapter, tmp_path, edit, reason):
    from ossforge.errors import UserError
    from ossforge.finetune.config import LoraConfig
    from ossforge.finetune.lora import apply_lora, load_init_adapter

    folder = _adapter_copy(stock_adapter, tmp_path / "edited", edit)
    lora = LoraConfig(r=4, alpha=8, init_adapter=str(folder))
    model = apply_lora(tiny_model, lora)
    with pytest.raises(UserError) as exc:
        load_init_adapter(model, lora, "c.yaml")
    assert str(exc.value).startswith(f"c.yaml: lora.init_adapter: {folder / 'adapter_model.safetensors'} ")
    assert reason in str(exc.value) and "\n" not in str(exc.value)


def test_crash_while_saving_keeps_previous_adapter(tiny_model, tmp_path, monkeypatch):
    import peft.peft_model
    from ossforge.finetune.config import LoraConfig
    from ossforge.finetune.lora import apply_lora
    from ossforge.finetune.run_dir import save_adapter

    model = apply_lora(tiny_model, LoraConfig(r=2, alpha=4))
    out = tmp_path / "adapter"
    save_adapter(model, out)
    before = load_file(out / "adapter_model.safetensors")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)

    real_save = peft.peft_model.safe_save_file

    def crash_midway(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")  # the write had started...
        raise OSError("disk full")  # ...when the process died

    monkeypatch.setattr(peft.peft_model, "safe_save_file", crash_midway)
    with pytest.raises(OSError):
        save_adapter(model, out)
    after = load_file(out / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], "the staging folder is removed"

    monkeypatch.setattr(peft.peft_model, "safe_save_file", real_save)
    save_adapter(model, out)
    new = load_file(out / "adapter_model.safetensors")
    assert not all(torch.equal(before[k], new[k]) for k in before), "a completed save replaces the adapter"


def test_bad_configs_exit_2_and_write_nothing(tmp_path):
    bad_r = write_config(tmp_path, "bad_r", max_steps=2)
    proc = run_cli("train", str(bad_r), "--set", "lora.r=0")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {bad_r}: lora.r:") and "Traceback" not in proc.stderr

    contradiction = write_config(tmp_path, "contra")
    proc = run_cli("train", str(contradiction), "--set", "deepspeed.gradient_accumulation_steps=8")
    assert proc.returncode == 2, proc.stderr
    assert "deepspeed.gradient_accumulation_steps" in proc.stderr and "training.grad_accum" in proc.stderr

    proc = run_cli("train", str(contradiction), "--resume")
    assert proc.returncode == 2 and "--resume" in proc.stderr and "no checkpoint" in proc.stderr
    assert not (tmp_path / "bad_r").exists() and not (tmp_path / "contra").exists()


def test_loss_only_where_labels_are(tiny_model):
    """The trainer's loss (logits only at labelled positions) equals transformers' full-logits loss."""
    from ossforge.finetune.data import build_examples
    from ossforge.finetune.trainer import collate, compute_loss

    examples, _ = build_examples(DATA, 96)
    batch = collate(examples[:3], "cpu")
    ours = compute_loss(tiny_model, batch)
    theirs = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"]).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits(tmp_path):
    config = write_config(tmp_path, "interrupted", max_steps=10_000, seq_len=64)
    # a fresh single-rank job: not the rendezvous of an in-process run earlier in this worker
    dist_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "ossforge", "train", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the summary is printed once the Ctrl-C handler is in place
        if line.startswith("  engine"):
            break
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "stopped at step" in out
    run = tmp_path / "interrupted"
    tag = (run / "checkpoints" / "latest").read_text().strip()
    assert (run / "checkpoints" / tag).is_dir()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert tag == f"step-{steps[-1]}"


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_lr_schedule_decays_to_min_lr_ratio(kind):
    from ossforge.finetune.config import TrainingConfig
    from ossforge.finetune.trainer import lr_lambda

    factor = lr_lambda(TrainingConfig(max_steps=110, warmup_steps=10, lr_scheduler=kind, min_lr_ratio=0.3))
    assert factor(0) < factor(9) < 1.0 and factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.65)  # halfway: both schedules are at the midpoint
    assert factor(110) == pytest.approx(0.3) and factor(500) == pytest.approx(0.3)
    assert lr_lambda(TrainingConfig(max_steps=110, lr_scheduler=kind))(110) == pytest.approx(0.0)
