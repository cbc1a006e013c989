"""``initialize_engine`` keeps DeepSpeed's start-up broadcast off the frozen base (finetune/frozen_broadcast.py):
only the LoRA parameters are sent, and no MXFP4-resident expert weight is dequantised into a dense
temporary for it. One rank, gloo, in this process."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
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


def _check_rank(rank: int, port: int, seeds: tuple[int, int], queue) -> None:
    import os

    import torch.distributed as dist

    from ossforge.errors import UserError
    from ossforge.finetune.frozen_broadcast import check_frozen_weights_agree
    from ossforge.model.local_experts import ep_expert_range
    from ossforge.model.presets import build_random, make_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    # Each rank builds only its half of the experts (EP=2), seeded per global expert: the experts differ
    # by rank, the replicated base does not unless the seeds do.
    model = build_random("tiny", seed=seeds[rank], vocab_size=512, pad_token_id=0, eos_token_id=1,
                         expert_range=ep_expert_range(make_config("tiny").num_local_experts, rank, 2))
    try:
        check_frozen_weights_agree(model)
        queue.put((rank, None))
    except UserError as exc:
        queue.put((rank, str(exc)))
    dist.destroy_process_group()


def _run_check(seeds):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_check_rank, args=(r, port, seeds, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


@pytest.mark.multiprocess
def test_ranks_with_different_frozen_bases_fail_on_every_rank_and_equal_ones_pass():
    assert _run_check((0, 0)) == {0: None, 1: None}  # experts differ by rank (EP=2); not compared
    errors = _run_check((0, 1))
    assert errors[0] == errors[1] and "rank 1's frozen base differs from rank 0's" in errors[0]
    assert "model.embed_tokens.weight" in errors[0] and "\n" not in errors[0]
