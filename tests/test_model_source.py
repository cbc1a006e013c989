"""Real weights one flag away: ``model.path`` replaces a preset (and back) on the command line and through
``extends:``; the shipped GPU configs name a weights folder, a missing one is exit 2 with the download
hint, and ``ossforge plan`` still works without the weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ossforge.errors import UserError
from ossforge.finetune.config import load_config
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
GPU_CONFIGS = ["medicine-20b.yaml", "education-20b.yaml", "medicine-120b-8xh100.yaml", "medicine-120b-2x8xh100.yaml"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A loadable tiny gpt-oss folder (the tiny preset saved as HF safetensors)."""
    from ossforge.model.checkpoint import save_base
    from ossforge.model.presets import build_random

    folder = tmp_path_factory.mktemp("weights") / "tiny-oss"
    save_base(build_random("tiny", seed=0), folder)
    return folder


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_every_gpu_config_takes_a_weights_folder_or_a_preset(name, tiny_folder):
    cfg = load_config(REPO / "configs" / name, [f"model.path={tiny_folder}"])
    assert cfg.model.path == str(tiny_folder) and cfg.model.preset is None
    cfg = load_config(REPO / "configs" / name, ["model.preset=tiny"])
    assert cfg.model.preset == "tiny" and cfg.model.path is None
    # and back again: the preset replaced by a path on the same command line
    cfg = load_config(REPO / "configs" / name, ["model.preset=tiny", f"model.path={tiny_folder}"])
    assert cfg.model.path == str(tiny_folder) and cfg.model.preset is None


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_shipped_gpu_configs_name_the_published_weights(name):
    raw = load_config(REPO / "configs" / name, check_files=False)
    folder = Path(raw.model.path)
    assert raw.model.preset is None and folder.name in ("gpt-oss-20b", "gpt-oss-120b")
    assert folder.resolve().parent == (REPO / "models").resolve()


def test_missing_weights_folder_is_exit_2_with_the_download_hint(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "configs/medicine-120b-8xh100.yaml", "--set", f"output_dir={out}")
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: configs/medicine-120b-8xh100.yaml: model.path: weights folder not found")
    assert "huggingface-cli download openai/gpt-oss-120b --local-dir" in line and "models/gpt-oss-120b" in line
    assert "model.preset=gpt-oss-120b" in line and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_extends_path_replaces_the_parents_preset_and_back(tmp_path, tiny_folder):
    data = tmp_path / "train.jsonl"
    data.write_text("")
    parent = tmp_path / "parent.yaml"
    parent.write_text(yaml.safe_dump({"model": {"preset": "tiny", "init_seed": 3}, "data": {"train": str(data)}}))
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"extends": "parent.yaml", "model": {"path": str(tiny_folder)}}))
    cfg = load_config(child)
    assert cfg.model.path == str(tiny_folder) and cfg.model.preset is None and cfg.model.init_seed == 3
    grandchild = tmp_path / "grandchild.yaml"
    grandchild.write_text(yaml.safe_dump({"extends": "child.yaml", "model": {"preset": "tiny-quickstart"}}))
    cfg = load_config(grandchild)
    assert cfg.model.preset == "tiny-quickstart" and cfg.model.path is None
    # one file that names both is still a mistake
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({"model": {"preset": "tiny", "path": str(tiny_folder)}, "data": {"train": str(data)}}))
    with pytest.raises(UserError, match="set only one of model.preset and model.path"):
        load_config(both)


def test_plan_works_without_the_weights(tmp_path):
    """No weights folder: the architecture comes from the preset the folder is named after, or from a
    config.json alone."""
    proc = run_cli("plan", "configs/medicine-120b-8xh100.yaml", "--gpus", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    preset = json.loads(run_cli("plan", "configs/medicine-120b-8xh100.yaml", "--gpus", "8", "--json",
                                "--set", "model.preset=gpt-oss-120b").stdout)
    assert plan["per_gpu_gib"] == preset["per_gpu_gib"] and plan["weights_gib"] == preset["weights_gib"]

    from ossforge.model.presets import PRESETS

    only_config = tmp_path / "my-weights"
    only_config.mkdir()
    (only_config / "config.json").write_text(json.dumps({"model_type": "gpt_oss", **PRESETS["gpt-oss-20b"]}))
    proc = run_cli("plan", "configs/medicine-20b.yaml", "--gpus", "1", "--json", "--set", f"model.path={only_config}")
    assert proc.returncode == 0, proc.stderr
    twenty = json.loads(run_cli("plan", "configs/medicine-20b.yaml", "--gpus", "1", "--json").stdout)
    assert json.loads(proc.stdout)["weights_gib"] == twenty["weights_gib"]


@pytest.mark.parametrize("name,world", [("medicine-20b.yaml", 1), ("education-20b.yaml", 1),
                                        ("medicine-120b-8xh100.yaml", 8), ("medicine-120b-2x8xh100.yaml", 16)])
def test_gpu_recipes_train_one_to_three_epochs(name, world):
    cfg = load_config(REPO / "configs" / name, ["model.preset=tiny"])
    t = cfg.training
    examples, _ = _packed(cfg.data.train, t.seq_len, cfg.data.packing)
    epochs = t.max_steps * t.micro_batch_size * t.grad_accum * world / len(examples)
    assert 1.0 <= epochs <= 3.0, (name, len(examples), epochs)
    assert 0 < t.save_every < t.max_steps  # at least one checkpoint before the end
    assert t.warmup_steps < t.max_steps / 5


_PACKED: dict = {}


def _packed(path, seq_len, packing):
    from ossforge.finetune.data import build_examples

    key = (path, seq_len, packing)
    if key not in _PACKED:
        _PACKED[key] = build_examples(path, seq_len, drop_analysis=False, packing=packing)
    return _PACKED[key]
