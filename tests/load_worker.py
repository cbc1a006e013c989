"""One rank of the sharded-load tests, started by the DeepSpeed launcher from tests/test_sharded_load_ranks.py.

Runs the trainer's own model preparation (``build_model -> apply_lora -> prepare_modules ->
apply_expert_parallel -> initialize_engine``) on a sharded MXFP4 folder, once per ``--runs`` entry
(``FORMAT:EP``; FORMAT ``config`` keeps the config's ``model.expert_format``), measuring this rank's peak host
RSS (VmHWM, reset once everything is imported) during the load, ``deepspeed.initialize`` and the first step,
then a second step. Each run also records the expert-weight bytes its parameters hold, a fingerprint of
this rank's frozen expert weights before and after ``deepspeed.initialize`` (the engine must not overwrite
one rank's experts with another's), and how often a packed expert weight was dequantised during it.
Writes ``rank{R}.json`` with one entry per run (``ep2``/``ep1`` for ``config``, else ``mxfp4-ep2`` ...).

With ``--adapters DIR`` each run also saves its adapter to ``DIR/<run>/`` (gathered, as ``ossforge train``)
and rank 0 writes the trained model's logits on a probe batch (and its token ids) to ``DIR/<run>/probe.safetensors``.

    deepspeed --num_gpus 2 tests/load_worker.py --config CFG.yaml --out DIR [--runs mxfp4:2,bf16:2] [--adapters DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from ossforge.finetune import trainer  # noqa: E402
from ossforge.finetune.config import load_config  # noqa: E402
from ossforge.finetune.expert_parallel import ep_independent  # noqa: E402
from ossforge.finetune.lora import apply_lora  # noqa: E402
from ossforge.finetune.run_dir import RunDir, save_adapter  # noqa: E402
from ossforge.model.mxfp4_experts import MXFP4Tensor, expert_modules, resident_expert_bytes  # noqa: E402
from tests.dequantise_count import DequantiseCount  # noqa: E402


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


def probe_ids(vocab: int) -> torch.Tensor:
    """The same token rows on every rank."""
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(99))


def expert_storage(model) -> dict:
    """What the expert ``gate_up_proj``/``down_proj`` parameters hold, measured on their storages."""
    storages, logical, packed = {}, 0, 0
    for experts in expert_modules(model):
        for name in ("gate_up_proj", "down_proj"):
            p = experts._parameters[name]
            logical += p.numel()
            parts = (p.blocks, p.scales) if isinstance(p, MXFP4Tensor) else (p,)
            packed += isinstance(p, MXFP4Tensor)
            for t in parts:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return {"resident_bytes": resident_expert_bytes(model), "storage_bytes": sum(storages.values()),
            "params": logical, "packed_tensors": packed, "local_experts": expert_modules(model)[0].num_experts}


def fingerprint(model) -> list[float]:
    """Per expert weight, a position-weighted float64 sum of what it holds (its packed bytes when
    MXFP4-resident), one expert at a time (no model-sized temporary)."""
    out = []
    for experts in expert_modules(model):
        for name in ("gate_up_proj", "down_proj"):
            p = experts._parameters[name]
            held = p.blocks if isinstance(p, MXFP4Tensor) else p.detach()
            total = 0.0
            for e, one in enumerate(held):
                flat = one.reshape(-1).double()
                total += float((flat * (1 + torch.arange(flat.numel()).remainder(7) + e)).sum())
            out.append(total)
    return out


def run(config, fmt: str, ep: int, steps: int, out: Path, measure: bool, adapters: Path | None, key: str) -> dict:
    config = config.model_copy(deep=True)
    config.parallel.expert_parallel_size = ep
    if fmt != "config":
        config.model.expert_format = fmt
    rank, device, dtype = dist.get_rank(), torch.device("cpu"), torch.float32
    report = {}
    began = time.perf_counter()
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
            held = p.packed_nbytes() if isinstance(p, MXFP4Tensor) else p.numel() * p.element_size()
            weights["experts" if ".experts." in name else "dense"] += held
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    before = fingerprint(model)
    if measure:
        gc.collect()
        start = rss("VmRSS")
        reset_peak()
    with DequantiseCount() as dequantised:
        engine = trainer.initialize_engine(model, config, trainer.deepspeed_config(config, dtype, None))
    if measure:
        report["initialize_growth"] = rss() - start
    report.update(fingerprint_before=before, fingerprint_after=fingerprint(model),
                  dequantised_in_initialize=dequantised.calls, experts=expert_storage(model))
    losses = []
    for step in range(steps):
        loss = trainer.compute_loss(engine, batch(step, rank, model.config.vocab_size))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if measure and step == 0:
            report["after_first_step"] = rss() - base_rss
    report.update(losses=losses, weights=weights, trainable_bytes=trainable, seconds=time.perf_counter() - began)
    if adapters is not None:
        with ep_independent(engine):  # gathered expert LoRA: the file of an EP=1 run
            if rank == 0:
                save_adapter(engine, adapters / key)
        dist.barrier()
        engine.eval()
        ids = probe_ids(model.config.vocab_size)
        with torch.no_grad():  # every rank joins the EP all-to-alls
            logits = engine(input_ids=ids, logits_to_keep=0).logits
        if rank == 0:
            from safetensors.torch import save_file

            save_file({"input_ids": ids, "logits": logits.contiguous()}, str(adapters / key / "probe.safetensors"))
    del engine, model
    gc.collect()
    return report


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--runs", default="config:2,config:1", help="comma list of FORMAT:EP (FORMAT: config|bf16|mxfp4)")
    p.add_argument("--adapters", default=None)
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    config = load_config(args.config)
    out = Path(args.out)
    began = time.perf_counter()
    # Import everything the measured part uses (kernels, peft tuners, DeepSpeed engine) before the baseline.
    warm = load_config(args.config, ["model.preset=tiny"])
    trainer.initialize_engine(trainer.prepare_modules(apply_lora(trainer.build_model(
        warm, torch.device("cpu"), torch.float32, RunDir(out / "warm"), False)[0], warm.lora, None, seed=0), warm),
        warm, trainer.deepspeed_config(warm, torch.float32, None))
    gc.collect()
    results = {"warm_up_seconds": time.perf_counter() - began}
    for spec in args.runs.split(","):
        fmt, ep = spec.split(":")
        key = f"ep{ep}" if fmt == "config" else f"{fmt}-ep{ep}"
        results[key] = run(config, fmt, int(ep), args.steps, out, True,
                           Path(args.adapters) if args.adapters else None, key)
    rank = dist.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()


if __name__ == "__main__":
    main()
