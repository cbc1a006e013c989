"""`ossforge merge`: stock-peft adapter (attention + expert LoRA) -> checkpoint stock transformers loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import GptOssForCausalLM

from ossforge.cli import main
from ossforge.finetune.config import ModelConfig
from ossforge.model.checkpoint import load_model, save_base
from ossforge.model.presets import build_random
from tests.conftest import run_cli, stock_peft_lora

# <|start|>user<|message|>Hello<|end|><|start|>assistant : real o200k_harmony ids.
PROBE = torch.tensor([[200006, 1428, 200008, 13225, 200007, 200006, 173781]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=PROBE).logits.float()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run laid out as the trainer does: base/ (random-init tiny) + adapter/ (stock peft, non-zero B)."""
    run = tmp_path_factory.mktemp("run")
    base = build_random("tiny", seed=5).eval()
    base_gate_up = base.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    save_base(base, run / "base")
    peft_model = stock_peft_lora(base, seed=0, scale=0.05, task_type="CAUSAL_LM")
    peft_model.save_pretrained(run / "adapter")
    return {"run": run, "peft_logits": _logits(peft_model.eval()), "base_gate_up": base_gate_up}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_adapter_fixture_has_expert_lora(run_dir):
    with safe_open(run_dir["run"] / "adapter" / "adapter_model.safetensors", "pt") as f:
        names = list(f.keys())
    assert any("mlp.experts.lora_B" in n or "experts.base_layer.lora_B" in n for n in names), names[:8]
    assert any("q_proj.lora_B" in n for n in names)
    config = json.loads((run_dir["run"] / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((run_dir["run"] / "base").resolve())


def test_merge_loads_in_stock_transformers_with_adapter_logits(run_dir):
    run = run_dir["run"]
    res = run_cli("merge", "--adapter", str(run / "adapter"), "--out", str(run / "merged"))
    assert res.returncode == 0, res.stderr
    assert "merge check" in res.stdout
    merged = GptOssForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    assert merged.dtype == torch.float32  # auto keeps the base's precision
    with safe_open(run / "merged" / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]
    # Expert LoRA really went into the experts (peft 0.21 merges target_parameters).
    delta = (merged.model.layers[0].mlp.experts.gate_up_proj - run_dir["base_gate_up"]).abs().max()
    assert delta > 1e-3
    rel = _rel(_logits(merged), run_dir["peft_logits"])
    assert rel < 1e-5, rel  # fp32: only summation order differs (DESIGN target: <= 1e-3)
    info = json.loads((run / "merged" / "ossforge_merge.json").read_text())
    assert info["merge_logit_error"]["rel"] < 1e-5 and info["mxfp4"] is False


def test_merge_mxfp4_loads_through_our_loader(run_dir, capsys):
    run = run_dir["run"]
    out = run / "merged-mx"
    assert main(["merge", "--adapter", str(run / "adapter"), "--out", str(out), "--mxfp4"]) == 0
    assert "mxfp4 logit error" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in keys
    assert "model.layers.0.mlp.experts.gate_up_proj" not in keys
    model = load_model(ModelConfig(path=str(out)), dtype=torch.float32)
    err = (_logits(model) - run_dir["peft_logits"]).abs()
    reported = json.loads((out / "ossforge_merge.json").read_text())["mxfp4_logit_error"]
    # What we load back is what merge measured: same max error (different probe, same order of size).
    assert 0 < err.max().item() < 10 * reported["max_abs"]
    assert _rel(_logits(model), run_dir["peft_logits"]) < 0.5  # quantized, not broken


def test_explicit_base_and_bf16(run_dir, tmp_path):
    run = run_dir["run"]
    code = main(["merge", "--adapter", str(run / "adapter"), "--base", str(run / "base"),
                 "--out", str(tmp_path / "bf16"), "--dtype", "bf16"])
    assert code == 0
    merged = GptOssForCausalLM.from_pretrained(tmp_path / "bf16")
    assert merged.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert _rel(_logits(merged.float()), run_dir["peft_logits"]) < 3e-2


def test_base_search_order(run_dir, tmp_path):
    from ossforge.finetune.merge import find_base

    run = run_dir["run"]
    adapter = run / "adapter"
    # A moved run: the recorded absolute path is gone, the trainer's base/ beside adapter/ is found.
    assert find_base(adapter, {"base_model_name_or_path": str(tmp_path / "gone")}, None) == run / "base"
    assert find_base(adapter, {"base_model_name_or_path": None}, None) == run / "base"
    # A recorded local folder wins over the sibling, and --base over both.
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert find_base(adapter, {"base_model_name_or_path": str(other)}, None) == other
    assert find_base(adapter, {"base_model_name_or_path": str(other)}, str(run / "base")) == run / "base"


# -- user errors: exit 2, one line naming the file, nothing written ----------------------------

def _fails(capsys, *args, match):
    capsys.readouterr()  # drop earlier output (progress bars of fixtures)
    code = main(["merge", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and match in err, err
    assert "Traceback" not in err


def test_missing_adapter_folder(capsys, tmp_path):
    _fails(capsys, "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
           match=f"{tmp_path / 'nope'}: adapter folder not found")
    assert not (tmp_path / "o").exists()


def test_not_a_peft_adapter(capsys, tmp_path):
    (tmp_path / "a").mkdir()
    _fails(capsys, "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "o"),
           match="not a peft adapter: adapter_config.json not found")
    (tmp_path / "a" / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    _fails(capsys, "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "o"),
           match="adapter_config.json: peft_type: expected 'LORA', got 'IA3'")
    (tmp_path / "a" / "adapter_config.json").write_text('{"peft_type": "LORA",\n "r": }')
    _fails(capsys, "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "o"),
           match="adapter_config.json:2: invalid JSON")
    (tmp_path / "a" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    _fails(capsys, "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "o"),
           match="adapter_model.safetensors not found")
    assert not (tmp_path / "o").exists()


def test_base_not_found(capsys, run_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = json.loads((run_dir["run"] / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "openai/gpt-oss-20b"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (adapter / "adapter_model.safetensors").write_bytes(
        (run_dir["run"] / "adapter" / "adapter_model.safetensors").read_bytes())
    _fails(capsys, "--adapter", str(adapter), "--out", str(tmp_path / "o"),
           match="base_model_name_or_path: 'openai/gpt-oss-20b' is not a local model folder")
    _fails(capsys, "--adapter", str(adapter), "--base", str(tmp_path / "nobase"), "--out", str(tmp_path / "o"),
           match="--base: ")


def test_existing_out_is_not_overwritten(capsys, run_dir, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "precious.txt").write_text("x")
    _fails(capsys, "--adapter", str(run_dir["run"] / "adapter"), "--out", str(tmp_path / "o"),
           match="already exists")
    _fails(capsys, "--adapter", str(run_dir["run"] / "adapter"), "--out", str(run_dir["run"] / "base"),
           match="would overwrite")
    assert (tmp_path / "o" / "precious.txt").read_text() == "x"


def test_adapter_for_another_base(capsys, run_dir, tmp_path):
    other = build_random("tiny-quickstart", seed=0)
    save_base(other, tmp_path / "other")
    _fails(capsys, "--adapter", str(run_dir["run"] / "adapter"), "--base", str(tmp_path / "other"),
           "--out", str(tmp_path / "o"), match="adapter does not fit base model")
    assert not (tmp_path / "o").exists()


# -- streaming merge at scale, MXFP4 retention --------------------------------------------------

def _child_peak_rss(args: list[str]) -> tuple[int, str]:
    """(peak RSS in bytes, stdout) of one child process: its VmHWM, polled until it exits.

    Not ``ru_maxrss``: on Linux a child's rusage keeps the RSS of the forked parent (pytest) from before exec.
    """
    import os
    import subprocess
    import sys
    import tempfile
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    peak = 0
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, *args], env=env, stdout=out, stderr=err, text=True)
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    peak = max([peak] + [int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")])
            except OSError:  # exited between poll() and open()
                pass
            time.sleep(0.02)
        out.seek(0), err.seek(0)
        assert proc.returncode == 0, err.read()
        return peak, out.read()


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory):
    """A ~330 MB fp32 base in 40 MB shards (small vocabulary, many experts) and a stock-peft adapter on it."""
    folder = tmp_path_factory.mktemp("sharded")
    base = build_random("tiny", seed=1, vocab_size=4096, pad_token_id=0, eos_token_id=1, num_hidden_layers=24, num_local_experts=16,
                        hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=64, layer_types=["sliding_attention", "full_attention"] * 12).eval()
    save_base(base, folder / "base", max_shard_size="40MB")
    stock_peft_lora(base, seed=0, scale=0.05, task_type="CAUSAL_LM").save_pretrained(folder / "adapter")
    return folder


def test_streaming_merge_host_peak_is_one_shard_plus_adapter(sharded_base, tmp_path):
    base, adapter = sharded_base / "base", sharded_base / "adapter"
    shards = sorted(base.glob("model-*.safetensors"))
    total = sum(f.stat().st_size for f in shards)
    shard = max(f.stat().st_size for f in shards)
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    assert len(shards) >= 8 and total > 300e6
    # The same imports and meta-device model in a process that merges nothing: the baseline.
    baseline, _ = _child_peak_rss(["-c", "import sys; from pathlib import Path; from ossforge.finetune.merge import "
                                   "_meta_model, apply_adapter; apply_adapter(_meta_model(Path(sys.argv[1])), "
                                   "Path(sys.argv[2]), meta=True)", str(base), str(adapter)])
    peak, out = _child_peak_rss(["-m", "ossforge", "merge", "--adapter", str(adapter), "--base", str(base),
                                 "--out", str(tmp_path / "merged"), "--no-probe"])
    assert f"in {len(shards)} shard(s)" in out
    extra = peak - baseline
    print(f"streaming merge: peak {peak / 2**20:.0f} MiB, baseline {baseline / 2**20:.0f} MiB, "
          f"shard {shard / 2**20:.0f} MiB, adapter {adapter_bytes / 2**20:.1f} MiB, model {total / 2**20:.0f} MiB")
    # the shard's file pages + its merged tensors + their serialised bytes + the adapter, far below the model
    assert extra <= 3.5 * shard + 2 * adapter_bytes + 16 * 2**20, extra
    assert extra < 0.55 * total  # loading the model whole needs >= total
    # and the result is the merge: same logits as peft's adapter model on the base
    from peft import PeftModel

    ref = PeftModel.from_pretrained(GptOssForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    merged = GptOssForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    probe = PROBE % 4096
    with torch.no_grad():
        assert _rel(merged(input_ids=probe).logits, ref(input_ids=probe).logits) < 1e-5


@pytest.fixture(scope="module")
def grid_base(tmp_path_factory):
    """A tiny base whose experts lie on the MXFP4 grid, as the published checkpoints' do."""
    from ossforge.model.mxfp4 import fake_quantize_mxfp4

    folder = tmp_path_factory.mktemp("grid")
    model = build_random("tiny", seed=2).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                p.copy_(fake_quantize_mxfp4(p))
    save_base(model, folder / "base")
    return folder, model


@pytest.mark.parametrize("scale, warns", [(0.05, False), (2e-5, True)])
def test_mxfp4_retention_is_printed_and_warns_when_the_adapter_vanishes(grid_base, scale, warns, tmp_path, capsys):
    folder, model = grid_base
    adapter = tmp_path / f"adapter-{scale}"
    peft_model = stock_peft_lora(model, seed=0, scale=scale, task_type="CAUSAL_LM")
    peft_model.save_pretrained(adapter)
    peft_model.unload()  # the base module is shared with the fixture: take the LoRA layers off again
    capsys.readouterr()
    assert main(["merge", "--adapter", str(adapter), "--base", str(folder / "base"), "--out", str(tmp_path / "mx"),
                 "--mxfp4"]) == 0
    out = capsys.readouterr().out
    kept = json.loads((tmp_path / "mx" / "ossforge_merge.json").read_text())["mxfp4_retained"]
    assert "mxfp4 retained: expert weights" in out and "probe logit shift" in out
    assert f"{100 * kept['weight_retained']:.1f}%" in out
    if warns:  # deltas far below half an FP4 step: the re-quantised experts are the base again
        assert kept["weight_error_vs_delta"] > 1 or kept["weight_retained_along_delta"] < 0.9
        assert "warning: " in out and "MXFP4 re-quantisation" in out and "vLLM --enable-lora" in out and "without --mxfp4" in out
    else:
        assert kept["weight_retained_along_delta"] > 0.9 and kept["logit_shift_retained"] > 0.9
        assert kept["weight_error_vs_delta"] < 1 and "warning" not in out
