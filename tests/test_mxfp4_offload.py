"""ZeRO-Offload (DeepSpeedCPUAdam, optimizer state in host memory) takes the same steps as the default optimizer."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import REPO

DATA = REPO / "tests" / "fixtures" / "train" / "dosing_small.jsonl"


def _run(tmp_path, name, deepspeed, engines):
    import ossforge.finetune.trainer as trainer
    from ossforge.finetune.config import load_config

    cfg = {"model": {"preset": "tiny", "expert_format": "mxfp4"}, "data": {"train": str(DATA)},
           "lora": {"r": 4, "alpha": 8}, "deepspeed": deepspeed, "output_dir": str(tmp_path / name),
           "training": {"max_steps": 3, "lr": 5e-3, "micro_batch_size": 2, "grad_accum": 1, "seq_len": 64,
                        "warmup_steps": 1, "seed": 3, "max_grad_norm": 0.0}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    real = trainer.initialize_engine
    try:
        trainer.initialize_engine = lambda *a: engines.append(real(*a)) or engines[-1]
        trainer.train(load_config(path, []), config_path=str(path))
    finally:
        trainer.initialize_engine = real
    return [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_zero_offload_equals_default_optimizer_over_mxfp4_experts(tmp_path):
    from safetensors.torch import load_file

    engines = []
    default = _run(tmp_path, "default", {"zero_optimization": {"stage": 1}}, engines)
    offload = _run(tmp_path, "offload", {
        "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}},
        "optimizer": {"type": "AdamW", "params": {"lr": 5e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                                   "weight_decay": 0.0}}}, engines)
    assert type(engines[0].basic_optimizer).__name__ == "AdamW"
    assert type(engines[1].basic_optimizer).__name__ == "DeepSpeedCPUAdam" and engines[1].zero_cpu_offload()
    assert len(default) == len(offload) == 3
    for a, b in zip(offload, default):
        assert abs(a - b) <= 1e-5 * abs(b)
    adapters = [load_file(tmp_path / n / "adapter" / "adapter_model.safetensors") for n in ("default", "offload")]
    assert adapters[0].keys() == adapters[1].keys()
    # Losses agree to 1e-5, the adapters to 1e-5 in relative Frobenius norm. Single elements can differ by up to
    # ~6e-5 of the tensor's max: DeepSpeedCPUAdam's vectorised fp32 update rounds differently from torch's AdamW,
    # and Adam's first steps are ~lr * sign(grad) for elements whose gradient is near eps.
    for key, want in adapters[0].items():
        assert (adapters[1][key] - want).norm() <= 1e-5 * want.norm(), key
