"""One rank of the sharded-load memory test, started by the DeepSpeed launcher from tests/test_sharded_load_ranks.py.

Runs the trainer's own model preparation (``build_model -> apply_lora -> prepare_modules ->
apply_expert_parallel -> initialize_engine``) on a sharded MXFP4 folder, first at ``--ep 2`` measuring this
rank's peak host RSS (VmHWM, reset once everything is imported) during the load and the first step, then
a second step; then the same at EP=1 (data parallel over the 2 ranks, all experts on each), measured alike. Writes
``rank{R}.json`` with the measured peaks, the bytes the budget is made of, and both runs' losses.

    deepspeed --num_gpus 2 tests/load_worker.py --config CFG.yaml --out DIR
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from ossforge.finetune import trainer  # noqa: E402
from ossforge.finetune.config import load_config  # noqa: E402
from ossforge.finetune.lora import apply_lora  # noqa: E402
from ossforge.finetune.run_dir import RunDir  # noqa: E402


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def rss(field: str = "VmHWM") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def batch(step: int, rank: int, vocab: int, seq: int = 64):
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, vocab, (2, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def run(config, ep: int, steps: int, out: Path, measure: bool) -> dict:
    config = config.model_copy(deep=True)
    config.parallel.expert_parallel_size = ep
    rank, device, dtype = dist.get_rank(), torch.device("cpu"), torch.float32
    report = {}
    gc.collect()
    base_rss = rss("VmRSS")
    if measure:
        reset_peak()
    model, base_path = trainer.build_model(config, device, dtype, RunDir(out), resume=False)
    if measure:
        report["after_load"] = rss() - base_rss
    torch.manual_seed(config.training.seed)
    model = apply_lora(model, config.lora, base_path, seed=config.training.seed)
    model = trainer.prepare_modules(model, config)
    trainer.apply_expert_parallel(model, ep)
    weights = {"dense": 0, "experts": 0}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            weights["experts" if ".experts." in name else "dense"] += p.numel() * p.element_size()
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    engine = trainer.initialize_engine(model, config, trainer.deepspeed_config(config, dtype, None))
    losses = []
    for step in range(steps):
        loss = trainer.compute_loss(engine, batch(step, rank, model.config.vocab_size))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if measure and step == 0:
            report["after_first_step"] = rss() - base_rss
    report.update(losses=losses, weights=weights, trainable_bytes=trainable)
    del engine, model
    gc.collect()
    return report


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    config = load_config(args.config)
    out = Path(args.out)
    # Import everything the measured part uses (kernels, peft tuners, DeepSpeed engine) before the baseline.
    warm = load_config(args.config, ["model.preset=tiny"])
    trainer.initialize_engine(trainer.prepare_modules(apply_lora(trainer.build_model(
        warm, torch.device("cpu"), torch.float32, RunDir(out / "warm"), False)[0], warm.lora, None, seed=0), warm),
        warm, trainer.deepspeed_config(warm, torch.float32, None))
    gc.collect()
    ep2 = run(config, 2, args.steps, out, measure=True)
    ep1 = run(config, 1, args.steps, out, measure=True)
    rank = dist.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps({"ep2": ep2, "ep1": ep1}))
    dist.barrier()


if __name__ == "__main__":
    main()
