"""One rank of an expert-parallel training run, started by the DeepSpeed launcher from the EP tests.

tiny gpt-oss (8 experts) -> peft LoRA (attention + expert LoRA via target_parameters) -> [fuse_moe] ->
apply_expert_parallel -> deepspeed.initialize; a few AdamW steps on rank-specific random token batches.
Writes ``losses_rank{R}.json``; after ``--save-at`` steps and at the end an EP-independent checkpoint
(full peft adapter + full optimizer state, gathered over the EP group); ``--resume`` continues from one
at whatever EP size this run has.

    deepspeed --num_gpus 2 tests/ep_worker.py --ep 2 --steps 4 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from ossforge.finetune.expert_parallel import (  # noqa: E402
    _unwrap_experts, apply_expert_parallel, gathered_experts, optimizer_param_groups)
from ossforge.model.presets import build_random  # noqa: E402


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", required=True)
    p.add_argument("--save-at", type=int, default=0)
    p.add_argument("--resume", default=None, help="checkpoint dir written by --save-at")
    p.add_argument("--dead-experts", default="7", help="experts no token is routed to: comma list per layer, layers separated by ';'")
    p.add_argument("--fused", type=int, default=0, help="1: ossforge.model.fuse_moe before EP")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--suite", action="store_true",
                   help="EP=1, EP=2 (fused) and EP=1 resuming EP=2's --save-at checkpoint, under OUT/{ep1,ep2,resumed}")
    p.add_argument("--local_rank", type=int, default=0)
    return p.parse_args()


def build(args, fused: int):
    model = build_random("tiny", seed=0)
    with torch.no_grad():
        per_layer = args.dead_experts.split(";")
        for i, layer in enumerate(model.model.layers):
            for e in (int(x) for x in per_layer[min(i, len(per_layer) - 1)].split(",") if x):
                layer.mlp.router.bias[e] = -1e4  # never in anyone's top-k
    config = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False,  # random A and B: expert LoRA matters from step 0
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    torch.manual_seed(1)
    model = get_peft_model(model, config)
    if fused:
        from ossforge.model import fuse_moe

        fuse_moe(model)
    return model


def batch(step: int, rank: int, seq: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, 4000, (2, seq), generator=g)
    return ids, ids.clone()


def save(model, optimizer, out: Path, step: int, rank: int):
    with gathered_experts(model, optimizer=optimizer):
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(out / "adapter")
            torch.save({"optimizer": optimizer.state_dict(), "step": step}, out / "optimizer.pt")
    dist.barrier()


def run(args, ep: int, fused: int, out: Path, resume: str | None) -> None:
    """One training run (its own model and engine); several can follow each other in one process."""
    rank = dist.get_rank()
    model = build(args, fused)
    apply_expert_parallel(model, ep)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model), lr=1e-2)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer,
        config={"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                "zero_optimization": {"stage": 0}, "steps_per_print": 10**9},
    )
    start = 0
    if resume:
        state = torch.load(Path(resume) / "optimizer.pt", weights_only=True)
        with gathered_experts(model, optimizer=optimizer):
            set_peft_model_state_dict(model, load_file(Path(resume) / "adapter" / "adapter_model.safetensors"))
            optimizer.load_state_dict(state["optimizer"])
        start = state["step"]

    losses = {}
    for step in range(start, args.steps):
        ids, labels = batch(step, rank, args.seq)
        loss = engine(input_ids=ids, labels=labels).loss
        engine.backward(loss)
        engine.step()
        losses[step] = loss.item()
        if args.save_at and step + 1 == args.save_at:
            save(model, optimizer, out / f"step{step + 1}", step + 1, rank)
    save(model, optimizer, out / "final", args.steps, rank)
    local = _unwrap_experts(model.base_model.model.model.layers[0].mlp.experts)[0].num_experts
    (out / f"losses_rank{rank}.json").write_text(json.dumps({"losses": losses, "local_experts": local}))


def main():
    args = parse()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    out = Path(args.out)
    if not args.suite:
        run(args, args.ep, args.fused, out, args.resume)
        return
    # The test suite in one launch: EP=1 stock path, EP=2 fused path, EP=1 resuming EP=2's checkpoint.
    run(args, 1, 0, out / "ep1", None)
    run(args, 2, 1, out / "ep2", None)
    run(args, 1, 0, out / "resumed", str(out / "ep2" / f"step{args.save_at}"))


if __name__ == "__main__":
    main()
