"""The clipping rule (finetune/grad_clip.py) at EP=1, the DeepSpeed config it implies, the ZeRO + EP
refusal, and the device-side expert-load counter. Single process, no DeepSpeed engine (the 2-rank
EP=2-vs-EP=1 comparison on every engine path is in tests/test_expert_parallel.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ossforge.finetune.config import TrainingConfig

REPO = Path(__file__).resolve().parents[1]


def _lora_model():
    from peft import LoraConfig, get_peft_model

    from ossforge.model.presets import build_random

    model = build_random("tiny", seed=0)
    config = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    return get_peft_model(model, config)


def _backward(model):
    ids = torch.randint(0, 4000, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.parametrize("max_norm", [1e-3, 1e6])
def test_clip_gradients_equals_torch_clip_at_ep1(max_norm):
    from ossforge.finetune.grad_clip import clip_gradients

    model = _lora_model()
    _backward(model)
    params = [p for p in model.parameters() if p.requires_grad]
    assert any(".experts." in n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None)
    reference = [p.grad.clone() for p in params]
    ref_params = [torch.nn.Parameter(torch.zeros_like(g)) for g in reference]
    for p, g in zip(ref_params, reference):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(ref_params, max_norm)

    norm = clip_gradients(model, max_norm)
    assert norm.dim() == 0 and norm.device == params[0].device  # a device tensor: no host read
    torch.testing.assert_close(norm, torch.stack([g.norm() for g in reference]).norm())
    for p, ref in zip(params, ref_params):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-6, atol=0)
    if max_norm > norm:
        assert all(torch.equal(p.grad, g) for p, g in zip(params, reference))  # nothing clipped
    else:
        assert torch.stack([p.grad.norm() for p in params]).norm() == pytest.approx(max_norm, rel=1e-5)


def _ds(stage: int, dtype=torch.float32, **training):
    from ossforge.finetune.trainer import deepspeed_config

    config = SimpleNamespace(training=TrainingConfig(max_grad_norm=0.5, **training),
                             deepspeed={"zero_optimization": {"stage": stage}})
    return deepspeed_config(config, dtype, None)


def test_deepspeed_config_leaves_zero0_clipping_to_us_and_accumulates_bf16_in_fp32():
    assert _ds(0)["gradient_clipping"] == 0.0  # train_step clips with the EP=1 rule
    assert _ds(2)["gradient_clipping"] == 0.5  # DeepSpeed's ZeRO-1/2 norm already is that rule
    assert _ds(1, torch.bfloat16)["data_types"] == {"grad_accum_dtype": "fp32"}
    assert _ds(2, torch.bfloat16)["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in _ds(0, torch.bfloat16)  # DeepSpeed 0.19 has no fp32 accumulation at ZeRO-0
    assert "data_types" not in _ds(2)


def _config(stage: int, ep: int):
    from ossforge.finetune.config import Config

    return Config.model_validate({"model": {"preset": "tiny"},
                                  "data": {"train": str(REPO / "data" / "medicine" / "train.jsonl")},
                                  "parallel": {"expert_parallel_size": ep},
                                  "deepspeed": {"zero_optimization": {"stage": stage}}})


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_with_expert_parallelism_is_a_config_error(stage):
    from ossforge.errors import UserError
    from ossforge.finetune.plan import check_topology

    with pytest.raises(UserError) as err:
        check_topology(_config(stage, 2), 2, "run.yaml")
    message = str(err.value)
    assert message == (f"run.yaml: deepspeed.zero_optimization.stage: ZeRO-{stage} is not supported with "
                       f"parallel.expert_parallel_size 2; use stage 0 with expert parallelism")
    assert "\n" not in message
    assert check_topology(_config(stage, 1), 2, "run.yaml") == (1, 2)
    assert check_topology(_config(0, 2), 2, "run.yaml") == (2, 1)


def test_expert_load_counts_on_the_device_without_padding():
    from ossforge.finetune.trainer import ExpertLoad

    model = _lora_model()
    load = ExpertLoad(model)
    ids = torch.randint(0, 4000, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # 4 padding tokens, routed but not counted
    load.active = mask
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    load.active = None
    assert sorted(load.counts) == [0, 1]
    for counts in load.counts.values():
        assert isinstance(counts, torch.Tensor) and counts.device == ids.device
        assert counts.sum().item() == 16 * model.config.num_experts_per_tok  # 16 real tokens x top-k
    shares = load.read()
    assert len(shares) == 2 and all(abs(sum(row) - 1) < 1e-3 for row in shares)
    assert load.counts == {} and load.read() == []
