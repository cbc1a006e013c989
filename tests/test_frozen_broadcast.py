"""``initialize_engine`` keeps DeepSpeed's start-up broadcast off the frozen base (finetune/frozen_broadcast.py):
only the LoRA parameters are sent, and no MXFP4-resident expert weight is dequantised into a dense
temporary for it. One rank, gloo, in this process."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tests.dequantise_count import DequantiseCount
from tests.test_deepspeed_api import BroadcastLog


def _packed_lora_model():
    from peft import LoraConfig, get_peft_model

    from ossforge.model.mxfp4_experts import quantize_experts_
    from ossforge.model.presets import build_random

    model = quantize_experts_(build_random("tiny", seed=0, vocab_size=512, pad_token_id=0, eos_token_id=1))
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    return get_peft_model(model, lora)


def _config():
    from ossforge.finetune.config import TrainingConfig

    return SimpleNamespace(training=TrainingConfig(max_steps=1), deepspeed={})


def test_initialize_engine_broadcasts_only_lora_and_never_dequantises_packed_experts(one_rank):
    import deepspeed

    from ossforge.finetune.frozen_broadcast import MARKER
    from ossforge.finetune.trainer import deepspeed_config, initialize_engine
    from ossforge.model.mxfp4_experts import MXFP4Tensor

    # Stock deepspeed.initialize: every parameter goes out, each packed expert weight through a dense temporary.
    model = _packed_lora_model()
    packed = sum(isinstance(p, MXFP4Tensor) for p in model.parameters())
    assert packed == 4  # gate_up and down of both layers
    with BroadcastLog() as log, DequantiseCount() as dequantised:
        deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                             optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]),
                             config=deepspeed_config(_config(), torch.float32, None))
    assert len(log.sent) == len(list(model.parameters())) and dequantised.calls == packed

    # The trainer's: only the trainable LoRA tensors, no dense temporary, and no marker left behind.
    model = _packed_lora_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad and not isinstance(p, MXFP4Tensor)]
    with BroadcastLog() as log, DequantiseCount() as dequantised:
        engine = initialize_engine(model, _config(), deepspeed_config(_config(), torch.float32, None))
    assert dequantised.calls == 0
    assert len(log.sent) == len(trainable) and log.pointers() == {p.data_ptr() for p in trainable}
    assert not log.pointers() & {p.data_ptr() for p in frozen}
    assert not any(hasattr(p, MARKER) for p in model.parameters())
    assert engine.module is model
