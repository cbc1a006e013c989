"""fp32 gradient accumulation for bf16 at ZeRO-0 (finetune/grad_accum.py), through ``train_step`` and a
real DeepSpeed engine (``FP16_UnfusedOptimizer``), one rank in this process. The 2-rank EP=2-vs-EP=1
suite (tests/test_expert_parallel.py, bf16-z0 at grad_accum 2) runs the same path with an all-reduce."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from ossforge.finetune.config import TrainingConfig

ACCUM = 16


def _model():
    from peft import LoraConfig, get_peft_model

    from ossforge.model.presets import build_random

    model = build_random("tiny", seed=0).to(torch.bfloat16)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    torch.manual_seed(1)
    return get_peft_model(model, config, autocast_adapter_dtype=False).train()


def _examples(count: int = 2 * ACCUM, seq: int = 24) -> list[dict]:
    rows = torch.randint(0, 4000, (count, seq), generator=torch.Generator().manual_seed(5)).tolist()
    return [{"input_ids": r, "labels": r} for r in rows]


def _gradients_seen_by_the_optimizer(model, fp32_accumulation: bool) -> tuple[list[torch.Tensor], str]:
    """One ``train_step`` of ACCUM micro-batches; the fp32 gradients the wrapped torch AdamW steps on."""
    from ossforge.finetune.trainer import Batches, ExpertLoad, deepspeed_config, initialize_engine, train_step

    training = TrainingConfig(max_steps=1, micro_batch_size=2, grad_accum=ACCUM, seq_len=32, max_grad_norm=0.0,
                              lr_scheduler="constant")
    config = SimpleNamespace(training=training, deepspeed={"zero_optimization": {"stage": 0}})
    engine = initialize_engine(model, config, deepspeed_config(config, torch.bfloat16, None))
    assert engine.ossforge_accumulation is not None  # on by default for bf16 at ZeRO-0 with grad_accum > 1
    if not fp32_accumulation:
        engine.ossforge_accumulation = None  # DeepSpeed's own ZeRO-0 bf16 path: autograd adds in bf16
    seen = {}

    def record(opt, args, kwargs):  # each bf16 weight's fp32 master carries the gradient the update uses
        for low, master in zip(engine.optimizer.fp16_groups, engine.optimizer.fp32_groups):
            seen.update((id(p), m.grad.clone()) for p, m in zip(low, master))

    engine.basic_optimizer.register_step_pre_hook(record)
    train_step(engine, Batches(_examples(), 2, seed=3), 0, config, torch.device("cpu"), ExpertLoad(model))
    return [seen[id(p)] for p in model.parameters() if p.requires_grad], type(engine.optimizer).__name__


def _reference(model) -> list[torch.Tensor]:
    """Each micro-batch's bf16 gradient on its own (what autograd gives one backward), summed in fp64."""
    from ossforge.finetune.trainer import Batches, compute_loss

    params = [p for p in model.parameters() if p.requires_grad]
    batches = Batches(_examples(), 2, seed=3)
    total = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    for m in range(ACCUM):
        loss = compute_loss(model, batches.get(m, torch.device("cpu"))) / ACCUM
        for t, g in zip(total, torch.autograd.grad(loss, params)):
            t += g.double()
    return total


def _rel_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    num = sum(((g.double() - w) ** 2).sum() for g, w in zip(got, want))
    return float(num.sqrt() / sum((w ** 2).sum() for w in want).sqrt())


@pytest.mark.slow
def test_bf16_zero0_accumulates_micro_batches_in_fp32(one_rank):
    model = _model()
    want = _reference(copy.deepcopy(model))
    ours, wrapper = _gradients_seen_by_the_optimizer(copy.deepcopy(model), fp32_accumulation=True)
    bf16_sums, _ = _gradients_seen_by_the_optimizer(copy.deepcopy(model), fp32_accumulation=False)
    assert wrapper == "FP16_UnfusedOptimizer"  # DeepSpeed's DDP_BFLOAT16 path, which has no fp32 accumulation
    assert len(ours) == len(want) == len(bf16_sums)
    # One rounding of the exact sum to bf16 per step: every element within half a bf16 ulp (2^-9 relative)
    # of the fp64 sum of the same micro-batch gradients; DeepSpeed's bf16 sums round at every micro-batch.
    for got, exact in zip(ours, want):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), exact.to(torch.bfloat16).double(), rtol=2 ** -8, atol=1e-30)
    ours_err, bf16_err = _rel_error(ours, want), _rel_error(bf16_sums, want)
    assert ours_err <= 2 ** -9
    assert bf16_err > 2 * ours_err, (bf16_err, ours_err)  # 3.1x here; 5.2x at 64 micro-batches


def test_accumulation_is_only_for_low_precision_zero0_with_several_micro_batches(one_rank):
    from ossforge.finetune.grad_accum import FP32GradAccumulation
    from ossforge.finetune.trainer import deepspeed_config

    def config(stage, accum):
        return SimpleNamespace(training=TrainingConfig(grad_accum=accum, max_grad_norm=0.5),
                               deepspeed={"zero_optimization": {"stage": stage}})

    engine = SimpleNamespace(module=_model(), zero_optimization_stage=lambda: 0)
    assert FP32GradAccumulation.needed(engine, 2) and not FP32GradAccumulation.needed(engine, 1)
    engine.zero_optimization_stage = lambda: 2
    assert not FP32GradAccumulation.needed(engine, 2)  # ZeRO-1/2: DeepSpeed's grad_accum_dtype fp32
    fp32 = SimpleNamespace(module=_model().float(), zero_optimization_stage=lambda: 0)
    assert not FP32GradAccumulation.needed(fp32, 2)
    # The all-reduce after the fp32 sum runs in fp32 at ZeRO-0 bf16 (DeepSpeed would reduce in bf16).
    assert deepspeed_config(config(0, 2), torch.bfloat16, None)["communication_data_type"] == "fp32"
    assert "communication_data_type" not in deepspeed_config(config(2, 2), torch.bfloat16, None)
    assert "communication_data_type" not in deepspeed_config(config(0, 2), torch.float32, None)
