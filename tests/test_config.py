"""Config loading: extends, --set overrides with coercion, unknown keys, cross-field checks, CLI errors."""

from pathlib import Path

import pytest
import yaml

from ossforge.errors import UserError
from ossforge.finetune.config import load_config
from tests.conftest import run_cli


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


@pytest.fixture
def data_file(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text("")
    return f


def base(data_file, **extra):
    cfg = {"model": {"preset": "tiny"}, "data": {"train": str(data_file)}, "output_dir": "runs/x"}
    cfg.update(extra)
    return cfg


def test_extends_merges_and_child_wins(tmp_path, data_file):
    parent = write(tmp_path / "parent.yaml", base(data_file, training={"lr": 0.1, "max_steps": 7}))
    sub = tmp_path / "sub"
    sub.mkdir()
    child = write(sub / "child.yaml", {"extends": "../parent.yaml", "training": {"lr": 0.5}})
    cfg = load_config(child)
    assert cfg.training.lr == 0.5 and cfg.training.max_steps == 7
    assert parent.exists()


def test_set_overrides_with_type_coercion(tmp_path, data_file):
    path = write(tmp_path / "c.yaml", base(data_file))
    cfg = load_config(path, ["training.max_steps=12", "lora.targets=[q_proj]", "training.gradient_checkpointing=true"])
    assert cfg.training.max_steps == 12
    assert cfg.lora.targets == ["q_proj"]
    assert cfg.training.gradient_checkpointing is True


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda c: c["training"].update(lerning_rate=1), "training.lerning_rate"),
        (lambda c: c["lora"].update(r=0), "lora.r"),
        (lambda c: c["training"].update(max_steps="many"), "training.max_steps"),
        (lambda c: c["parallel"].update(expert_parallel_size=3), "parallel.expert_parallel_size"),
        (lambda c: c["model"].update(preset="gpt-oss-7b"), "model"),
        (lambda c: c["data"].update(train="/nonexistent/x.jsonl"), "data.train"),
        (lambda c: c["lora"].update(expert_targets=["up_proj"]), "lora.expert_targets"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, data_file, mutate, field):
    cfg = base(data_file, training={}, lora={}, parallel={})
    mutate(cfg)
    path = write(tmp_path / "bad.yaml", cfg)
    with pytest.raises(UserError) as exc:
        load_config(path)
    assert str(exc.value).startswith(f"{path}: {field}")


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path / "broken.yaml", "model:\n  preset: tiny\n data: [\n")
    with pytest.raises(UserError) as exc:
        load_config(path)
    assert str(exc.value).startswith(f"{path}:") and "invalid YAML" in str(exc.value)


def test_train_cli_rejects_bad_config_with_exit_2(tmp_path, data_file):
    path = write(tmp_path / "bad.yaml", base(data_file, lora={"rank": 8}))
    out_dir = tmp_path / "run"
    result = run_cli("train", str(path), "--set", f"output_dir={out_dir}")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {path}: lora.rank: unknown key (check the spelling; see README 'Config keys')"
    assert "Traceback" not in result.stderr
    assert not out_dir.exists()
