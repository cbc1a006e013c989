"""Shared test fixtures: tiny gpt-oss models from GptOssConfig, the real harmony encoding."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Several xdist workers share 2 cores: one intra-op thread each avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Triton kernels run in the CPU interpreter in tests (DESIGN §6). It must be set before triton is first
# imported, and transformers/peft import triton, so any test module could do that before tests/test_kernels.py.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


@pytest.fixture(scope="session")
def harmony():
    """openai-harmony's gpt-oss encoding, loaded offline."""
    from ossforge.model.tokenizer import harmony_encoding

    return harmony_encoding()


@pytest.fixture
def tiny_model():
    """A fresh random tiny gpt-oss model (fp32, eval mode off, seed 0)."""
    from ossforge.model.presets import build_random

    return build_random("tiny", seed=0)


def stock_peft_lora(base, *, seed: int, scale: float, task_type: str | None = None):
    """Stock peft LoRA (r=4) on attention and, through ``target_parameters``, the experts, with every B
    filled with seeded noise of std ``scale`` so the adapter is not a no-op (peft starts B at zero)."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], task_type=task_type)
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


_DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run ``ossforge ARGS`` in a subprocess; returns CompletedProcess with text output.

    An in-process ``train()`` earlier in this worker leaves RANK/MASTER_PORT set for its own process group;
    a child inheriting them would take itself for a launched rank and bind that port again (EADDRINUSE).
    """
    full_env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "ossforge", *args],
        cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def one_rank():
    """A 1-rank gloo world in this process (as ``ossforge train`` without a launcher), for tests that call
    ``deepspeed.initialize`` directly. Left initialised afterwards, as the in-process trainer tests do:
    DeepSpeed caches its groups."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port))
        deepspeed.init_distributed(dist_backend="gloo")
    yield
