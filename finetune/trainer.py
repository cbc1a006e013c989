"""LoRA fine-tuning of gpt-oss on DeepSpeed.

The model is prepared by a sequence of small steps, each a function below::

    build_model -> apply_lora -> prepare_modules (grad checkpointing, fuse_moe)
        -> [expert parallelism] -> initialize_engine (deepspeed.initialize)

and the training step fits on one screen (:func:`train_step`). On CPU it runs as a single gloo
process in fp32; on GPUs in bf16, one process per GPU (started by the DeepSpeed launcher).

Resume is exact: the data order is a pure function of ``(training.seed, micro-batch index)``, the LR
schedule and optimizer state live in the DeepSpeed checkpoint, and the RNG state travels in its
client state. Ctrl-C stops after the current step, saves a checkpoint and the adapter, and exits.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ossforge.errors import UserError, where
from ossforge.finetune.host_memory import reuse_freed_memory
from ossforge.finetune.memory import gather_peaks
from ossforge.finetune.lora import apply_lora, check_init_adapter, load_init_adapter, peft_config, summarize
from ossforge.finetune.expert_parallel import (apply_expert_parallel, ep_independent, expert_parallel_size,
                                               gathered_experts, optimizer_param_groups)
from ossforge.finetune.frozen_broadcast import check_frozen_weights_agree, frozen_weights_not_broadcast
from ossforge.finetune.grad_accum import FP32GradAccumulation
from ossforge.finetune.grad_clip import clip_gradients, we_clip
from ossforge.finetune.plan import check_topology
from ossforge.finetune.run_dir import RunDir, save_adapter, unwrap
from ossforge.model.tokenizer import PAD

IGNORE = -100


# ----------------------------------------------------------------------------- data


@dataclass
class Data:
    train: list[dict]
    eval: list[dict]
    train_stats: object
    eval_stats: object | None


def load_data(config) -> Data:
    """Render train (and eval) sets; every data error surfaces here, before any model is built."""
    from ossforge.finetune.data import build_examples

    d, t = config.data, config.training
    train, train_stats = build_examples(d.train, t.seq_len, drop_analysis=d.drop_analysis, packing=d.packing)
    evals, eval_stats = [], None
    if d.eval:
        evals, eval_stats = build_examples(d.eval, t.seq_len, drop_analysis=d.drop_analysis, packing=d.packing)
    return Data(train, evals, train_stats, eval_stats)


class Batches:
    """Micro-batch ``m`` of the run: a pure function of (seed, m), so resume sees the same order.

    Each epoch is a fresh seeded permutation of the examples, cut into micro-batches (a last
    partial micro-batch is dropped unless the whole set is smaller than one micro-batch). With
    several data-parallel ranks, rank ``r`` takes global micro-batch ``m * world + r``.
    """

    def __init__(self, examples: list[dict], micro_batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.examples, self.size, self.seed, self.rank, self.world = examples, micro_batch_size, seed, rank, world
        self.per_epoch = max(1, len(examples) // micro_batch_size)
        self._order: tuple[int, list[int]] | None = None

    def indices(self, m: int) -> list[int]:
        epoch, b = divmod(m * self.world + self.rank, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.examples), generator=gen).tolist())
        return self._order[1][b * self.size:(b + 1) * self.size]

    def get(self, m: int, device) -> dict:
        return collate([self.examples[i] for i in self.indices(m)], device)


def collate(examples: list[dict], device) -> dict:
    """Right-pad to the longest example: pad id, label -100, attention mask 0, position 0.

    ``position_ids`` restart at 0 with every document of a packed example (its ``position_ids``) and
    run 0..n-1 otherwise; the model's masks keep attention inside each document
    (``ossforge.model.attention.apply_attention``)."""
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), length), PAD, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    positions = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
        positions[row, :n] = torch.tensor(e["position_ids"]) if "position_ids" in e else torch.arange(n)
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device),
            "position_ids": positions.to(device)}


# ----------------------------------------------------------------------------- model preparation


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def setup_distributed(device: torch.device) -> None:
    """``deepspeed.init_distributed``; a run started without a launcher is a single rank on a free port."""
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


BASE_MAX_BYTES = 20 * 1024**3  # random-init bases up to this size are written to base/, larger ones recorded


def build_model(config, device: torch.device, dtype: torch.dtype, run: RunDir, resume: bool):
    """The base ``GptOssForCausalLM`` with the dense weights and only this rank's experts.

    It is built on the meta device and filled tensor by tensor on ``device`` (``model.checkpoint``):
    with ``parallel.expert_parallel_size`` = EP, EP rank ``r`` materialises experts ``r*E/EP`` up to
    ``(r+1)*E/EP``, never the others. A random-init preset under ``BASE_MAX_BYTES`` is written to
    ``base/`` by rank 0 (which builds it whole for that); a larger one is recorded in
    ``base_record.json`` (preset, seed, dtype), from which merge and eval rebuild the same weights.

    Returns ``(model, base_path)``: where the base lives, recorded in the adapter config.
    """
    import torch.distributed as dist
    from transformers.utils import logging as hf_logging

    from ossforge.model.checkpoint import architecture_for, load_model, save_base
    from ossforge.model.local_experts import ep_expert_range, keep_local_experts
    from ossforge.model.presets import preset_params

    hf_logging.disable_progress_bar()  # one progress bar on screen: training's
    ep = config.parallel.expert_parallel_size
    rank = dist.get_rank() if dist.is_initialized() else 0
    local = ep_expert_range(architecture_for(config.model)["num_local_experts"], rank % ep, ep)
    if not config.model.preset:
        model = load_model(config.model, dtype=dtype, device=str(device), expert_range=local)
        return model, str(Path(config.model.path).resolve())
    small = preset_params(config.model.preset) * dtype.itemsize < BASE_MAX_BYTES
    written = resume and (run.base_dir / "config.json").is_file()
    if rank == 0 and small and not written:
        model = load_model(config.model, dtype=dtype, device=str(device))  # all experts, to write them
        save_base(model, run.base_dir)
        run.base_record.unlink(missing_ok=True)  # an earlier, larger run's record
        keep_local_experts(model, local)
    else:
        model = load_model(config.model, dtype=dtype, device=str(device), expert_range=local)
        if rank == 0 and not small:
            run.write_base_record(config.model, dtype)
    return model, str(run.base_dir.resolve())


def prepare_modules(model, config):
    """Training-time switches on the peft model: gradient checkpointing, fused MoE kernels."""
    if config.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.training.fused_moe:
        from ossforge.model import fuse_moe

        fuse_moe(model)
    apply_kernels(model, config.training.attention, config.training.loss)
    model.train()
    return model


def apply_kernels(model, attention: str = "auto", loss: str = "auto") -> tuple[str, str]:
    """``training.attention`` (document-aware masks, flex attention with sinks on CUDA) and
    ``training.loss`` (chunked / fused LM-head loss, read by :func:`compute_loss`) on the model;
    returns the (attention, loss) implementations chosen."""
    from ossforge.finetune.loss import resolve_loss
    from ossforge.model.attention import apply_attention, resolve_attention

    device = next(model.parameters()).device
    implementation = resolve_attention(attention, device)
    apply_attention(model, implementation)
    model.ossforge_loss = resolve_loss(loss, device, model.get_output_embeddings())
    return implementation, model.ossforge_loss


def check_kernels(config, device: torch.device) -> None:
    """``training.attention`` / ``training.loss`` choices that cannot run on ``device``: UserError now."""
    from ossforge.finetune.loss import resolve_loss
    from ossforge.model.attention import resolve_attention

    resolve_attention(config.training.attention, device)
    resolve_loss(config.training.loss, device)


def lr_lambda(training):
    """LR multiplier for optimizer step ``s``: linear warmup, then cosine / linear decay to
    ``min_lr_ratio`` or constant."""
    warmup, total, kind, floor = training.warmup_steps, training.max_steps, training.lr_scheduler, training.min_lr_ratio

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
        return floor + (1.0 - floor) * decay

    return factor


def deepspeed_config(config, dtype: torch.dtype, config_path) -> dict:
    """The ``deepspeed`` section completed from ``training``; contradictions are config errors."""
    t = config.training
    ds = copy.deepcopy(config.deepspeed)
    owned = {
        "train_micro_batch_size_per_gpu": (t.micro_batch_size, "training.micro_batch_size"),
        "gradient_accumulation_steps": (t.grad_accum, "training.grad_accum"),
        "gradient_clipping": (t.max_grad_norm, "training.max_grad_norm"),
    }
    for key, (value, ours) in owned.items():
        if key in ds and ds[key] != value:
            raise UserError(f"{where(config_path, 'deepspeed.' + key)}: {ds[key]} contradicts {ours}={value} "
                            f"(set it under training:)")
        ds[key] = value
    zero_stage = int((ds.get("zero_optimization") or {}).get("stage", 0))
    if zero_stage == 0:
        ds["gradient_clipping"] = 0.0  # train_step clips (finetune/grad_clip.py): DeepSpeed's ZeRO-0 norm is not EP=1's
    world = int(os.environ.get("WORLD_SIZE", 1))
    if "train_batch_size" in ds and ds["train_batch_size"] != t.micro_batch_size * t.grad_accum * world:
        raise UserError(f"{where(config_path, 'deepspeed.train_batch_size')}: {ds['train_batch_size']} != "
                        f"micro_batch_size x grad_accum x world size ({t.micro_batch_size} x {t.grad_accum} x {world})")
    zero = ds.setdefault("zero_optimization", {})
    zero.setdefault("stage", 0)
    if dtype == torch.bfloat16:
        ds.setdefault("bf16", {"enabled": True})
        if zero["stage"] in (1, 2):  # accumulate micro-batch gradients in fp32 (ZeRO-0 bf16 cannot in 0.19.8)
            ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
        else:  # ZeRO-0: FP32GradAccumulation sums micro-batches in fp32; the all-reduce sums ranks in fp32
            ds.setdefault("communication_data_type", "fp32")
    if zero["stage"] > 0 and "optimizer" not in ds:
        ds.setdefault("zero_allow_untested_optimizer", True)  # torch AdamW under ZeRO
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def initialize_engine(model, config, ds: dict):
    """``deepspeed.initialize`` with torch AdamW (no op build needed) and the LR schedule.

    A ``deepspeed.optimizer`` / ``deepspeed.scheduler`` section replaces ours. The frozen base is not
    broadcast at start-up (``finetune/frozen_broadcast.py``): every rank built it alike.
    """
    import deepspeed

    t = config.training
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    if "optimizer" not in ds:
        optimizer = torch.optim.AdamW(optimizer_param_groups(model), lr=t.lr, weight_decay=t.weight_decay,
                                      betas=(0.9, 0.999))  # expert LoRA in its own group (EP-independent)
    scheduler = None
    if "scheduler" not in ds:
        factor = lr_lambda(t)

        def scheduler(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, factor)

    with frozen_weights_not_broadcast(model):  # every rank loaded the same frozen base: nothing to send
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                               lr_scheduler=scheduler, config=ds)
    engine.ossforge_accumulation = (FP32GradAccumulation(engine)
                                    if FP32GradAccumulation.needed(engine, t.grad_accum) else None)
    return engine


# ----------------------------------------------------------------------------- the step


def compute_loss(model, batch: dict, aux_coef: float = 0.0):
    """Mean next-token loss over trained (label != -100) tokens, plus the optional router aux loss.

    The LM head runs only where a label is due: with a 201k vocabulary it dominates a small model, and
    most tokens (system, user, tool output) carry no loss. The model returns its final hidden states
    (no logits); :mod:`ossforge.finetune.loss` computes head + cross-entropy as ``training.loss`` chose
    (``prepare_modules``; chunked or Liger's fused kernel by default, never all logits at once).
    """
    from ossforge.finetune.loss import lm_loss, resolve_loss

    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    inner = unwrap(model)
    head = inner.get_output_embeddings()
    implementation = getattr(inner, "ossforge_loss", None) or resolve_loss("auto", head.weight.device, head)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch.get("position_ids"), logits_to_keep=torch.zeros_like(keep),
                output_hidden_states=True, output_router_logits=aux_coef > 0, use_cache=False)
    targets = labels[:, 1:][keep[:, :-1]]
    loss = lm_loss(implementation, head, out.hidden_states[-1][keep], targets) / max(1, targets.numel())
    if aux_coef > 0 and out.aux_loss is not None:
        loss = loss + aux_coef * out.aux_loss.to(loss.dtype)
    return loss


def train_step(engine, batches: Batches, step: int, config, device, load) -> tuple[torch.Tensor, int]:
    """One optimizer step over ``grad_accum`` micro-batches; returns (mean loss, tokens seen).

    The loss stays a device tensor (read at logging time) and tokens are counted on the host from
    the examples: the step itself never waits for the device. The gradient norm before clipping is
    left in ``engine.ossforge_grad_norm`` (a device tensor, or DeepSpeed's at ZeRO-1/2).
    """
    accum, t = config.training.grad_accum, config.training
    accumulation = getattr(engine, "ossforge_accumulation", None)  # fp32 sums for bf16 at ZeRO-0
    losses, tokens = [], 0
    for a in range(accum):
        m = step * accum + a
        batch = batches.get(m, device)
        load.active = batch["attention_mask"]
        loss = compute_loss(engine, batch, t.router_aux_loss_coef)
        load.active = None
        if accumulation is None:
            engine.backward(loss)
        else:
            accumulation.backward(loss)
            if a == accum - 1:
                accumulation.finish()  # the fp32 sum into param.grad, then DeepSpeed's all-reduce
        if a == accum - 1 and we_clip(engine):  # gradients are all-reduced now: clip by the EP=1 norm
            engine.ossforge_grad_norm = clip_gradients(engine, t.max_grad_norm)
        engine.step()  # DeepSpeed applies the update (optimizer, LR schedule; ZeRO-1/2 clip) on the last micro-batch
        if not we_clip(engine):
            engine.ossforge_grad_norm = engine.get_global_grad_norm()
        losses.append(loss.detach())
        tokens += sum(len(batches.examples[i]["input_ids"]) for i in batches.indices(m))
    return torch.stack(losses).float().mean(), tokens


@torch.no_grad()
def evaluate_loss(model, examples: list[dict], micro_batch_size: int, device) -> float:
    """Token-weighted mean loss over an example set."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), micro_batch_size):
        batch = collate(examples[i:i + micro_batch_size], device)
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        total += compute_loss(model, batch).item() * n
        count += n
    model.train(was_training)
    return total / max(1, count)


class ExpertLoad:
    """Tokens routed to each expert of each layer since the last read (forward hooks on the routers).

    Counts stay on the device (no sync in the forward); :meth:`read`, once per logged step, sums them
    over all ranks (every rank routes its own tokens; at EP>1 the router is replicated) and reads them.
    """

    def __init__(self, model):
        self.active = None  # attention mask of the batch being counted; None: not counting
        self.counts: dict[int, torch.Tensor] = {}
        for name, module in model.named_modules():
            if type(module).__name__ == "GptOssTopKRouter":
                layer = int(name.split("layers.")[1].split(".")[0])
                module.register_forward_hook(self._hook(layer, module.num_experts))

    def _hook(self, layer: int, num_experts: int):
        def hook(module, inputs, output):
            if self.active is None:
                return  # eval, or recomputation under gradient checkpointing
            indices = output[2].detach()  # [T, k]
            weight = torch.ones(indices.shape, dtype=torch.float32, device=indices.device)
            mask = self.active.reshape(-1)
            if indices.shape[0] == mask.numel():
                weight = weight * mask.to(weight.dtype).unsqueeze(1)  # padding routes but is not counted
            if layer not in self.counts:
                self.counts[layer] = torch.zeros(num_experts, dtype=torch.float32, device=indices.device)
            self.counts[layer].index_add_(0, indices.reshape(-1), weight.reshape(-1))  # bincount syncs on CUDA

        return hook

    def read(self) -> list[list[float]]:
        """Per layer, each expert's share of the routed token slots (1/E each when balanced)."""
        import torch.distributed as dist

        if not self.counts:
            return []
        layers = sorted(self.counts)
        counts = torch.stack([self.counts[layer] for layer in layers])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)  # a collective: every rank reads at the same logged steps
        shares = (counts.double() / counts.double().sum(1, keepdim=True).clamp(min=1)).tolist()
        self.counts = {}
        return [[round(x, 4) for x in row] for row in shares]


# ----------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    eval_loss: float | None = None
    interrupted: bool = False


class _StopFlag:
    """Ctrl-C sets a flag the loop checks between steps; a second Ctrl-C aborts at once."""

    def __init__(self):
        self.stop = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        print("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to abort)", flush=True)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def resolved_yaml(config) -> str:
    """``config.yaml`` of the run: the validated config with absolute data/model paths."""
    resolved = config.model_copy(deep=True)
    for section, key in (("data", "train"), ("data", "eval"), ("model", "path"), ("lora", "init_adapter")):
        value = getattr(getattr(resolved, section), key)
        if value is not None:
            setattr(getattr(resolved, section), key, str(Path(value).resolve()))
    return resolved.to_yaml()


def _client_state(step: int) -> dict:
    state = {"step": step, "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(state: dict) -> None:
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def print_summary(config, model, data: Data, engine, device, dtype, resumed_from: str | None, run: RunDir) -> None:
    t, m = config.training, model.config
    world = int(os.environ.get("WORLD_SIZE", 1))
    lora = summarize(model)
    source = f"{config.model.preset} (random init, seed {config.model.init_seed})" if config.model.preset else config.model.path
    per_step = t.micro_batch_size * t.grad_accum * world
    epochs = t.max_steps * per_step / max(1, len(data.train))
    stage = engine.zero_optimization_stage()
    lines = [
        f"ossforge train -> {run.path}" + (f" (resuming from {resumed_from})" if resumed_from else ""),
        f"  model      {source}: {m.num_hidden_layers} layers, {m.num_local_experts} experts (top-{m.num_experts_per_tok}), "
        f"hidden {m.hidden_size}, vocab {m.vocab_size:,}; {str(dtype).replace('torch.', '')} on {device.type}",
        f"  LoRA       r={config.lora.r} alpha={config.lora.alpha:g}: {lora.line()}",
    ]
    ep = expert_parallel_size(model)
    if ep > 1:
        expert_lora = sum(p.numel() for p in model.parameters() if p.requires_grad and hasattr(p, "ep_kind"))
        total = lora.trainable + (ep - 1) * expert_lora
        lines.append(f"  trainable  {total:,} in total across the {ep} EP ranks, {lora.trainable:,} per rank "
                     f"(expert LoRA {expert_lora:,} per rank, sharded; the rest replicated)")
    if config.lora.init_adapter:
        lines.append(f"  warm start skipped: resuming from checkpoint {resumed_from} (lora.init_adapter not loaded)"
                     if resumed_from else f"  warm start {config.lora.init_adapter}")
    lines += [
        f"  train      {config.data.train}: {data.train_stats.summary()}",
    ]
    if data.eval_stats is not None:
        lines.append(f"  eval       {config.data.eval}: {data.eval_stats.summary()}")
    lines += [
        f"  batch      {t.micro_batch_size} micro x {t.grad_accum} accum x {world} ranks = {per_step} sequences/step; "
        f"{t.max_steps} steps = {epochs:.2f} epochs"
        + ("; micro-batch gradients summed in fp32" if getattr(engine, "ossforge_accumulation", None) else ""),
        f"  optimizer  {'AdamW' if 'optimizer' not in config.deepspeed else config.deepspeed['optimizer'].get('type')} "
        f"lr {t.lr:g}, {t.lr_scheduler} schedule, warmup {t.warmup_steps}, clip {t.max_grad_norm:g}, weight decay {t.weight_decay:g}",
        f"  engine     DeepSpeed ZeRO-{stage}, fused MoE {'on' if t.fused_moe else 'off'}, gradient checkpointing "
        f"{'on' if t.gradient_checkpointing else 'off'}, router aux loss {t.router_aux_loss_coef:g}, "
        f"attention {model.config._attn_implementation}, loss {getattr(model, 'ossforge_loss', 'auto')}",
    ]
    print("\n".join(lines), flush=True)


def train(config, resume: bool = False, config_path=None, stop_after: int | None = None) -> TrainResult:
    """Fine-tune per ``config``; ``stop_after`` stops (like Ctrl-C) after that many steps of this run."""
    from ossforge.model.checkpoint import resolve_dtype

    t = config.training
    run = RunDir(config.output_dir)
    resume_tag = run.check_resumable() if resume else None
    device = pick_device()
    if device.type == "cpu":
        reuse_freed_memory()  # logit-sized buffers are reused instead of page-faulted in every step
    dtype = resolve_dtype(config.model.dtype, device.type)
    check_kernels(config, device)
    ds_config = deepspeed_config(config, dtype, config_path)
    peft_config(config.lora, 0)  # raises on an empty LoRA
    check_init_adapter(config.lora, config_path)  # a warm-start adapter must describe the same LoRA
    check_topology(config, int(os.environ.get("WORLD_SIZE", 1)), config_path, "start with --nproc N")
    data = load_data(config)  # all user errors are raised by now; nothing written yet
    setup_distributed(device)

    if _rank0():
        run.start(resolved_yaml(config), resume)  # checks, clearing and config.yaml: rank 0 only
    run.check_shared()  # every rank sees rank 0's run folder, or every rank stops here (exit 2)
    model, base_path = build_model(config, device, dtype, run, resume)
    check_frozen_weights_agree(model)  # the engine will not broadcast rank 0's base: every rank must hold it
    torch.manual_seed(t.seed)  # LoRA initialisation
    model = apply_lora(model, config.lora, base_path, seed=t.seed)  # expert LoRA at the local size
    model = prepare_modules(model, config)
    apply_expert_parallel(model, config.parallel.expert_parallel_size)  # mark the local experts for DeepSpeed
    if not resume_tag and config.lora.init_adapter:  # on resume the checkpoint's LoRA wins
        with gathered_experts(model):  # the adapter file holds all experts; each rank keeps its own
            load_init_adapter(model, config.lora, config_path)
    engine = initialize_engine(model, config, ds_config)
    load = ExpertLoad(model)
    batches = Batches(data.train, t.micro_batch_size, t.seed, engine.global_rank, engine.world_size)

    step = 0
    if resume_tag:
        with ep_independent(engine):  # checkpoints hold full experts: resume at any EP size
            state = run.load_checkpoint(engine, resume_tag)
        step = int(state.get("step", 0))
        _restore_rng(state)
        if _rank0():
            run.truncate_metrics(step)
    with _StopFlag() as flag:
        result = _loop(config, run, engine, data, batches, load, device, step, resume_tag, flag, stop_after, dtype)
    if _rank0():
        _write_report(run)
        _print_end(run, result)
    return result


def _write_report(run: RunDir) -> None:
    """``loss.png``, ``expert_load.png`` and ``report.html``; a figure that fails never fails the run."""
    from ossforge.finetune.report import write_report

    try:
        write_report(run.path)
    except Exception as exc:  # the adapter and checkpoints are saved: only the pictures are missing
        print(f"warning: {run.path}: run report not written: {exc}", file=sys.stderr)


def _loop(config, run, engine, data, batches, load, device, step, resume_tag, flag, stop_after, dtype) -> TrainResult:
    """Summary, then steps until max_steps or a stop; logs, evaluates and saves as configured."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    t, rank0 = config.training, _rank0()
    if rank0:
        print_summary(config, unwrap(engine), data, engine, device, dtype, resume_tag, run)
    writer = SummaryWriter(str(run.tensorboard_dir), purge_step=step + 1 if resume_tag else None) if rank0 else None
    result = TrainResult(run.path, step)
    bar = tqdm(total=t.max_steps, initial=step, desc="train", unit="step", disable=not rank0, dynamic_ncols=True)
    window, window_tokens, window_start = [], 0, time.perf_counter()
    start_step = step
    while step < t.max_steps:
        lr = engine.get_lr()[0]
        loss, tokens = train_step(engine, batches, step, config, device, load)  # loss: a device tensor
        step += 1
        window.append(loss)
        window_tokens += tokens
        bar.update(1)
        record = None
        if step % t.log_every == 0 or step == t.max_steps:
            elapsed = time.perf_counter() - window_start
            losses = torch.stack(window).tolist()  # the step's one read of the device, at logging time
            result.losses += losses
            mean = sum(losses) / len(losses)
            bar.set_postfix(loss=f"{mean:.3f}", tok_s=f"{window_tokens / max(elapsed, 1e-9):.0f}")
            record = {"step": step, "loss": round(mean, 6), "lr": lr,
                      "tokens_per_s": round(window_tokens / max(elapsed, 1e-9), 1), "tokens": window_tokens,
                      "expert_load": load.read()}
            norm = getattr(engine, "ossforge_grad_norm", None)
            if norm is not None:
                record["grad_norm"] = round(float(norm), 6)  # before clipping
            window, window_tokens, window_start = [], 0, time.perf_counter()
        if record or step == start_step + 1:  # a collective: every rank takes this branch together
            peaks = gather_peaks(device)
            if record:
                record.update(peaks.record())
            if step == start_step + 1 and rank0:
                bar.write(f"after step {step}: {peaks.line()}")
        if data.eval and ((t.eval_every and step % t.eval_every == 0) or step == t.max_steps):
            record = record or {"step": step}
            record["eval_loss"] = result.eval_loss = round(evaluate_loss(unwrap(engine), data.eval, t.micro_batch_size, device), 6)
            bar.write(f"step {step}: eval loss {record['eval_loss']:.4f}")
        if record and rank0:
            run.append_metrics(record)
            for key in ("loss", "lr", "tokens_per_s", "eval_loss"):
                if key in record:
                    writer.add_scalar("eval/loss" if key == "eval_loss" else f"train/{key}", record[key], step)
        stopping = flag.stop or (stop_after is not None and step - start_step >= stop_after)
        if (t.save_every and step % t.save_every == 0) or step == t.max_steps or stopping:
            with ep_independent(engine):  # gather sharded experts: files as at EP=1
                run.save_checkpoint(engine, step, _client_state(step))
                if rank0:
                    save_adapter(engine, run.adapter_dir)
        if stopping:
            result.interrupted = True
            break
    bar.close()
    if window:  # stopped between logged steps
        result.losses += torch.stack(window).tolist()
    result.steps = step
    if writer is not None:
        writer.close()
    return result


def _print_end(run: RunDir, result: TrainResult) -> None:
    records = run.read_metrics()
    losses = [r["loss"] for r in records if "loss" in r]
    lines = []
    if result.interrupted:
        lines.append(f"stopped at step {result.steps}; continue with: ossforge train CONFIG --resume")
    if losses:
        drop = 100 * (losses[0] - losses[-1]) / losses[0] if losses[0] else 0.0
        lines.append(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} ({drop:.0f}% lower) over {result.steps} steps")
    if result.eval_loss is not None:
        lines.append(f"eval loss {result.eval_loss:.4f}")
    memory = [r for r in records if "peak_host_gib" in r]
    if memory:
        device = memory[-1].get("peak_device_gib")
        lines.append(f"peak memory: host {memory[-1]['peak_host_gib']:.2f} GiB, "
                     f"{'no device' if device is None else f'device {device:.2f} GiB'} (max over ranks)")
    report = f"  report: {run.report_html}" if run.report_html.is_file() else ""
    lines.append(f"adapter: {run.adapter_dir}  metrics: {run.metrics_file}  curve: {run.loss_png}{report}")
    print("\n".join(lines), flush=True)
