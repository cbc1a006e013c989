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


# ----------------------------------------------------------------------------- lora.init_adapter


@pytest.fixture(scope="module")
def stock_adapter(tmp_path_factory) -> Path:
    """A stock-peft adapter folder (r=4, alpha=8, attention + both expert parameters) on the tiny preset."""
    from ossforge.model.presets import build_random
    from tests.conftest import stock_peft_lora

    folder = tmp_path_factory.mktemp("stock") / "adapter"
    stock_peft_lora(build_random("tiny", seed=0), seed=1, scale=0.01).save_pretrained(str(folder))
    return folder


def warm(data_file, adapter, **lora):
    return base(data_file, lora={"r": 4, "alpha": 8, "init_adapter": str(adapter), **lora})


def test_init_adapter_resolves_relative_to_the_config_file(tmp_path, data_file, stock_adapter, monkeypatch):
    import shutil

    sub = tmp_path / "configs"
    sub.mkdir()
    shutil.copytree(stock_adapter, tmp_path / "warm")
    path = write(sub / "c.yaml", warm(data_file, "../warm"))
    monkeypatch.chdir(data_file.parent.parent)  # not the config's folder
    cfg = load_config(path)
    assert Path(cfg.lora.init_adapter).resolve() == (tmp_path / "warm").resolve()


def test_init_adapter_target_order_does_not_matter(tmp_path, data_file, stock_adapter):
    """peft may write target_modules as a list in any order (it holds a set)."""
    import json
    import shutil

    copy = tmp_path / "reordered"
    shutil.copytree(stock_adapter, copy)
    saved = json.loads((copy / "adapter_config.json").read_text())
    saved["target_modules"] = sorted(saved["target_modules"], reverse=True)
    saved["target_parameters"] = list(reversed(saved["target_parameters"]))
    (copy / "adapter_config.json").write_text(json.dumps(saved))
    cfg = load_config(write(tmp_path / "c.yaml", warm(data_file, copy)))
    assert cfg.lora.init_adapter == str(copy)


@pytest.mark.parametrize(
    "lora, adapter, reason",
    [
        ({"r": 16}, None, "r 4 in the adapter, 16 in lora.r"),
        ({"alpha": 16}, None, "lora_alpha 8 in the adapter, 16 in lora.alpha"),
        ({"targets": ["q_proj", "v_proj"]}, None,
         "target_modules [k_proj, o_proj, q_proj, v_proj] in the adapter, [q_proj, v_proj] from lora.targets"),
        ({"expert_layers": [1]}, None, "target_parameters [mlp.experts.down_proj, mlp.experts.gate_up_proj] in the "
                                       "adapter, [model.layers.1.mlp.experts.down_proj, model.layers.1.mlp.experts."
                                       "gate_up_proj] from lora.expert_targets/expert_layers"),
        ({}, "missing", "adapter folder not found"),
        ({}, "no_weights", "is not a peft adapter folder (no adapter_model.safetensors)"),
        ({}, "a_file", "expected the adapter folder, got a file"),
        ({}, "rslora", "use_rslora True in the adapter"),
        ({"init_adapter": ""}, None, "empty path"),
    ],
)
def test_bad_init_adapter_names_the_field(tmp_path, data_file, stock_adapter, lora, adapter, reason):
    import json
    import shutil

    folder = stock_adapter
    if adapter == "no_weights":
        folder = tmp_path / "partial"
        folder.mkdir()
        shutil.copy(stock_adapter / "adapter_config.json", folder)
    elif adapter == "a_file":
        folder = stock_adapter / "adapter_model.safetensors"
    elif adapter == "rslora":
        folder = tmp_path / "rslora"
        shutil.copytree(stock_adapter, folder)
        saved = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**saved, "use_rslora": True}))
    elif adapter == "missing":
        folder = tmp_path / "nowhere"
    path = write(tmp_path / "bad.yaml", warm(data_file, folder, **lora))
    with pytest.raises(UserError) as exc:
        load_config(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: lora.init_adapter: ") and reason in message
    assert "\n" not in message


def test_train_cli_rejects_mismatched_init_adapter_with_exit_2(tmp_path, data_file, stock_adapter):
    path = write(tmp_path / "bad.yaml", warm(data_file, stock_adapter))
    out_dir = tmp_path / "run"
    result = run_cli("train", str(path), "--set", "lora.r=16", "--set", f"output_dir={out_dir}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (f"error: {path}: lora.init_adapter: r 4 in the adapter, 16 in lora.r "
                                     f"(adapter {stock_adapter})")
    assert not out_dir.exists()
