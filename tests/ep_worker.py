"""One rank of the expert-parallel suite, started by the EP tests (DeepSpeed launcher, gloo) or by itself.

tiny gpt-oss (8 experts) -> peft LoRA (attention + expert LoRA via target_parameters) -> [fuse_moe] ->
apply_expert_parallel -> the trainer's ``deepspeed_config`` / ``initialize_engine`` / ``train_step``
(its clipping rule, ``training.max_grad_norm`` small enough that every step clips) on rank-specific
random token rows; checkpoints through ``RunDir`` inside ``ep_independent``, as ``ossforge train``.

For each engine path of ``--paths`` (``fp32-z0``, ``fp32-z2``, ``bf16-z0``, ``bf16-z2``) the suite runs
under OUT/<path>/: ``ep1`` (stock transformers + peft), ``ep2`` (fused kernels in fp32), and for ZeRO-0
``ep2-to-ep2`` / ``ep2-to-ep1``, which resume ep2's step-2 checkpoint. Each run writes
``result_rank{R}.json``: losses and gradient norms (before clipping) per step, expert load, host syncs of
one step; rank 0 writes the adapter of every saved step.

    deepspeed --num_gpus 2 tests/ep_worker.py --out DIR --paths fp32-z0,bf16-z0
    python tests/ep_worker.py --spawn 2 --device cuda --paths bf16-z0,bf16-z2 --check --out DIR
        # one GPU, 2 ranks sharing it over gloo; asserts EP=2 == EP=1 and writes DIR/figures.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_NUM_THREADS", "1")
if "cuda" not in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: Triton kernels in the interpreter
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from ossforge.finetune.config import TrainingConfig  # noqa: E402
from ossforge.finetune.expert_parallel import _unwrap_experts, apply_expert_parallel, ep_independent  # noqa: E402
from ossforge.finetune.run_dir import RunDir, save_adapter  # noqa: E402
from ossforge.finetune.trainer import Batches, ExpertLoad, deepspeed_config, initialize_engine, train_step  # noqa: E402
from ossforge.model.presets import build_random  # noqa: E402
from tests.host_syncs import HostSyncs  # noqa: E402

MAX_GRAD_NORM = 0.05  # below every step's norm here: each step clips (the runs assert it)


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--paths", default="fp32-z0,fp32-z2", help="comma list of <fp32|bf16>-z<stage>")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--save-at", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--dead-experts", default="4,5,6,7;7",
                   help="experts no token is routed to: comma list per layer, layers separated by ';'")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--spawn", type=int, default=0, help="start this many ranks (no launcher), all on --device")
    p.add_argument("--check", action="store_true", help="with --spawn: assert and write OUT/figures.json")
    p.add_argument("--local_rank", type=int, default=0)
    return p.parse_args()


def build(args, dtype, fused: bool, device):
    model = build_random("tiny", seed=0)
    with torch.no_grad():
        per_layer = args.dead_experts.split(";")
        for i, layer in enumerate(model.model.layers):
            for e in (int(x) for x in per_layer[min(i, len(per_layer) - 1)].split(",") if x):
                layer.mlp.router.bias[e] = -1e4  # never in anyone's top-k
    model = model.to(device=device, dtype=dtype)
    config = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False,  # random A and B: expert LoRA matters from step 0
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    torch.manual_seed(1)
    model = get_peft_model(model, config, autocast_adapter_dtype=False)
    if fused:
        from ossforge.model import fuse_moe

        fuse_moe(model)
    return model.train()


def examples(args, count: int = 64) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    rows = torch.randint(0, 4000, (count, args.seq), generator=g).tolist()
    return [{"input_ids": r, "labels": r} for r in rows]


def run(args, path: str, ep: int, out: Path, resume: Path | None, device) -> None:
    """One training run (its own model and engine); several follow each other in one process."""
    precision, stage = path.split("-z")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    rank, world = dist.get_rank(), dist.get_world_size()
    training = TrainingConfig(max_steps=args.steps, lr=1e-2, micro_batch_size=2, grad_accum=args.grad_accum,
                              seq_len=args.seq + 1, max_grad_norm=MAX_GRAD_NORM, lr_scheduler="constant")
    config = SimpleNamespace(training=training, deepspeed={"zero_optimization": {"stage": int(stage)}})
    # EP=2 on the fused kernels (in bf16 only on a GPU: the CPU interpreter's bf16 dot is not exact).
    fused = ep > 1 and (dtype == torch.float32 or device.type == "cuda")
    model = build(args, dtype, fused=fused, device=device)
    apply_expert_parallel(model, ep)
    engine = initialize_engine(model, config, deepspeed_config(config, dtype, None))
    load = ExpertLoad(model)
    batches = Batches(examples(args), training.micro_batch_size, seed=3, rank=rank, world=world)
    rundir = RunDir(out)
    start = 0
    if resume is not None:
        with ep_independent(engine):
            state = RunDir(resume).load_checkpoint(engine, f"step-{args.save_at}")
        start = state["step"]

    result = {"losses": {}, "grad_norms": {}, "ep": ep, "optimizer": type(engine.optimizer).__name__,
              "local_experts": _unwrap_experts(model.base_model.model.model.layers[0].mlp.experts)[0].num_experts}
    for step in range(start, args.steps):
        if step == start:
            with HostSyncs() as syncs:
                loss, _ = train_step(engine, batches, step, config, device, load)
            result["host_syncs"] = {"ours": syncs.ours, "total": syncs.total, "our_sites": syncs.our_sites()}
        else:
            loss, _ = train_step(engine, batches, step, config, device, load)
        result["losses"][step] = float(loss)
        result["grad_norms"][step] = float(engine.ossforge_grad_norm)
        if step + 1 == args.save_at or step + 1 == args.steps:
            with ep_independent(engine):
                rundir.save_checkpoint(engine, step + 1, {"step": step + 1})
                if rank == 0:
                    save_adapter(engine, out / f"adapter-{step + 1}")
            dist.barrier()
    result["expert_load"] = load.read()
    (out / f"result_rank{rank}.json").write_text(json.dumps(result))
    del engine


def spawn(args) -> None:
    """Start ``--spawn`` ranks of this script without a launcher (two ranks may share one GPU)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [a for a in sys.argv[1:]]
    i = argv.index("--spawn")
    del argv[i:i + 2]
    procs = []
    for rank in range(args.spawn):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(args.spawn),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, __file__, *argv], env=env))
    codes = [p.wait() for p in procs]
    if max(codes) == 0 and args.check:
        from tests.test_expert_parallel import PATHS, check_suite, suite_figures

        paths = [p for p in PATHS if p[0] in args.paths.split(",")]
        figures = suite_figures(Path(args.out), paths)
        (Path(args.out) / "figures.json").write_text(json.dumps(figures, indent=1))
        print(json.dumps(figures, indent=1))
        check_suite(Path(args.out), paths)  # raises AssertionError (exit 1) when EP=2 differs from EP=1
        print("EP=2 matches EP=1 with clipping on:", ", ".join(p for p, _, _ in paths))
    sys.exit(max(codes))


def main():
    args = parse()
    if args.spawn:
        spawn(args)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="gloo")  # gloo: 2 ranks may share one device
    torch.set_num_threads(1)
    out = Path(args.out)
    for path in args.paths.split(","):
        base = out / path
        run(args, path, 1, base / "ep1", None, device)
        run(args, path, 2, base / "ep2", None, device)
        if path.endswith("z0"):
            run(args, path, 2, base / "ep2-to-ep2", base / "ep2", device)
            run(args, path, 1, base / "ep2-to-ep1", base / "ep2", device)


if __name__ == "__main__":
    main()
