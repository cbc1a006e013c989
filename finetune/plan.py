"""Estimate per-rank memory and the EP x DP layout of a config, before anything is allocated.

Arithmetic over the architecture (preset or the checkpoint's config.json) and the config, modelling what
the trainer actually runs:

  weights      frozen base: expert shard (experts / EP) + replicated non-expert params; MXFP4 experts
               (``model.expert_format: mxfp4``) at 4.25 bits per parameter
  load peak    what a rank holds while loading: all experts when the loader materialises them before
               expert parallelism drops the others, its own experts with the rank-sharded loader
               (``ossforge.model.local_experts``); a preset written to ``base/`` adds its serialised shard
  lora         trainable LoRA params on this rank (expert LoRA sharded like the experts), and in total
  optimizer    AdamW: two fp32 moments (+ an fp32 master copy for bf16 weights), ZeRO>=1 divides them
               over the DP group; ``offload_optimizer`` moves them to host memory
  gradients    one gradient per LoRA param (ZeRO>=2 divides them)
  activations  at training.micro_batch_size x training.seq_len: saved tensors per layer (all layers,
               or the layer inputs plus one recomputed layer under gradient checkpointing), plus the
               attention implementation in use (``training.attention``; auto = flex on CUDA, eager on
               CPU): eager keeps one B x heads x S x (S+1) softmax per layer and ~3 more while a
               layer's forward/backward runs (transformers 5.24 ``eager_attention_forward``: scores,
               masked scores, concat with the sinks, softmax in the compute dtype); flex is linear in S.
               The LM head computes logits only for trained tokens (the trained fraction is read from
               the data file when it exists); ``training.loss`` chunked/liger keeps one chunk of them.
  overhead     GPU: CUDA context, NCCL buffers, allocator slack (a fixed allowance). CPU: the process
               (python, torch, transformers, deepspeed, the harmony vocabulary) and the glibc heap that
               ``finetune/host_memory.py`` keeps (freed blocks are reused, never returned), calibrated.

``--device cpu`` plans a CPU run (fp32, eager attention): per-rank host RSS, compared with the
``peak_host_gib`` that training writes to metrics.jsonl in BENCHMARKS.md.
World size = --gpus (default: parallel.expert_parallel_size); DP = world / EP.
Examples:
  ossforge plan configs/medicine-120b-8xh100.yaml --gpus 8 --gpu-mem-gib 80
  ossforge plan configs/medicine-120b-2x8xh100.yaml --gpus 16 --json
  ossforge plan configs/medicine-tiny.yaml --device cpu
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ossforge.errors import UserError

GIB = 1024**3
OVERHEAD_GIB = 2.0  # CUDA context + NCCL + allocator fragmentation, per GPU
# A CPU rank before the model: python + torch + transformers + peft + deepspeed + the harmony vocabulary
# (measured: VmRSS 0.59 GiB after imports and data rendering, torch 2.13 CPU, 2026-12-02).
CPU_PROCESS_GIB = 0.6
DEFAULT_TRAINED_FRACTION = 0.5  # without a data file: half the tokens carry a loss (chat data: 0.2-0.5)
LOSS_CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk of the chunked loss (finetune/loss.py)
EAGER_TRANSIENT_SCORES = 3  # score-sized temporaries live while one layer's eager attention runs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set parallel.expert_parallel_size=4")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="world size: GPUs over all nodes (default: parallel.expert_parallel_size)")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, metavar="M",
                   help="memory of one GPU in GiB (default 80, an H100)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="plan a GPU run (per-GPU memory, default) or a CPU run (per-rank host RSS)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")


@dataclass
class Arch:
    layers: int
    experts: int
    top_k: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "Arch":
        return cls(d["num_hidden_layers"], d["num_local_experts"], d["num_experts_per_tok"], d["hidden_size"],
                   d["intermediate_size"], d["num_attention_heads"], d["num_key_value_heads"],
                   d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"], d["vocab_size"],
                   bool(d.get("tie_word_embeddings", False)))

    def attn_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each attention projection."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden)}

    def expert_params_per_layer(self) -> int:
        h, i = self.hidden, self.intermediate
        return self.experts * (h * 2 * i + 2 * i + i * h + h)

    def dense_params(self) -> int:
        """Everything that is not an expert: embeddings, attention (+bias, sinks), norms, routers."""
        attn = sum(a * b + b for a, b in self.attn_shapes().values()) + self.heads
        per_layer = attn + 2 * self.hidden + self.experts * self.hidden + self.experts
        heads = self.vocab * self.hidden * (1 if self.tied else 2)
        return heads + self.layers * per_layer + self.hidden


@dataclass
class Plan:
    model: str
    gpus: int
    ep: int
    dp: int
    expert_dp: int
    gpu_mem_gib: float
    total_params: int
    weights_gib: float
    weights_expert_gib: float
    weights_dense_gib: float
    weights_mxfp4_gib: float
    lora_params_per_gpu: int
    lora_params_total: int
    lora_gib: float
    optimizer_gib: float
    gradients_gib: float
    activations_gib: float
    overhead_gib: float
    per_gpu_gib: float
    fits: bool
    zero_stage: int
    all_to_all_gib_per_step: float
    notes: list[str] = field(default_factory=list)
    device: str = "cuda"
    attention: str = "eager"
    loss: str = "full"
    expert_format: str = "bf16"
    trained_fraction: float = DEFAULT_TRAINED_FRACTION
    trained_fraction_source: str = ""
    logit_tokens: int = 0
    attention_scores_gib: float = 0.0
    logits_gib: float = 0.0
    load_peak_gib: float = 0.0
    host_gib_per_rank: float = 0.0
    optimizer_offload: bool = False
    host_optimizer_gib: float = 0.0  # ZeRO-Offload: optimizer state and fp32 gradients in host memory


def arch_of(config, config_path) -> tuple[str, Arch]:
    """Architecture from the preset or from ``model.path``/config.json (no weights read)."""
    if config.model.preset:
        from ossforge.model.presets import PRESETS

        return config.model.preset, Arch.from_dict(PRESETS[config.model.preset])
    from ossforge.model.checkpoint import architecture_for  # config.json alone, or the preset a missing folder is named after

    cfg_file = Path(config.model.path) / "config.json"
    try:
        return str(config.model.path), Arch.from_dict(architecture_for(config.model))
    except (UserError, ValueError, KeyError) as exc:
        raise UserError(f"{config_path}: model.path: cannot read the architecture from {cfg_file}: {exc}") from None


def check_topology(config, world_size: int, config_path, world_field: str = "--gpus") -> tuple[int, int]:
    """(ep, dp) for ``world_size`` ranks; UserError naming the field when the layout is impossible."""
    ep = config.parallel.expert_parallel_size
    _, arch = arch_of(config, config_path)
    if world_size < 1:
        raise UserError(f"{config_path}: {world_field}: must be >= 1, got {world_size}")
    if arch.experts % ep:
        raise UserError(f"{config_path}: parallel.expert_parallel_size: {ep} does not divide the model's "
                        f"{arch.experts} experts")
    if world_size % ep:
        raise UserError(f"{config_path}: parallel.expert_parallel_size: {ep} does not divide the world size "
                        f"{world_size} ({world_field})")
    stage = int((config.deepspeed.get("zero_optimization") or {}).get("stage", 0))
    if ep > 1 and stage > 0:
        # ZeRO-1/2 keep expert shards in per-rank flat fp32 partitions whose checkpoints neither load at
        # another EP size nor convert with zero_to_fp32; ZeRO-3 partitions the experts themselves.
        raise UserError(f"{config_path}: deepspeed.zero_optimization.stage: ZeRO-{stage} is not supported with "
                        f"parallel.expert_parallel_size {ep}; use stage 0 with expert parallelism")
    return ep, world_size // ep


def _lora_params(config, arch: Arch, ep: int) -> tuple[int, int]:
    """(per GPU, total) trainable LoRA parameters; expert LoRA is sharded over EP like its experts."""
    r = config.lora.r
    shapes = arch.attn_shapes()
    attn = arch.layers * sum(r * sum(shapes[t]) for t in config.lora.targets if t in shapes)
    expert_layers = len(config.lora.expert_layers) if config.lora.expert_layers is not None else arch.layers
    h, i = arch.hidden, arch.intermediate
    per_layer = {"gate_up_proj": r * arch.experts * (h + 2 * i), "down_proj": r * arch.experts * (i + h)}
    experts = expert_layers * sum(per_layer[t] for t in config.lora.expert_targets)
    return attn + experts // ep, attn + experts


def attention_in_use(config, device: str) -> str:
    """``training.attention`` resolved exactly as the trainer resolves it (flex on CUDA for auto)."""
    from ossforge.model.attention import resolve_attention

    return resolve_attention(config.training.attention, device)


def loss_in_use(config, device: str) -> str:
    """``training.loss`` resolved as the trainer does; a LoRA-wrapped ``lm_head`` rules out Liger."""
    from ossforge.finetune.loss import resolve_loss

    if config.training.loss == "auto" and "lm_head" in config.lora.targets:
        return "chunked"
    return resolve_loss(config.training.loss, device)


def expert_format_in_use(config, device: str) -> str:
    """``model.expert_format`` resolved as the loader does (auto: mxfp4 for an MXFP4 folder on CUDA)."""
    from ossforge.model.checkpoint import folder_expert_format

    return folder_expert_format(config.model.expert_format, config.model.path, device)


def trained_fraction(config) -> tuple[float, str]:
    """(fraction of a micro-batch's tokens that get logits, where it comes from).

    From the data file when it exists: the densest example (trained tokens / seq_len), since the peak
    is set by the densest micro-batch of the run. Otherwise ``DEFAULT_TRAINED_FRACTION``.
    """
    path = Path(config.data.train)
    if path.is_file():
        from ossforge.finetune.data import build_examples

        try:
            examples, _ = build_examples(path, config.training.seq_len, drop_analysis=config.data.drop_analysis,
                                         packing=config.data.packing)
        except UserError:
            pass  # a broken data file is `ossforge data check`'s business; plan with the default
        else:
            densest = max(sum(1 for x in e["labels"][1:] if x != -100) for e in examples)
            return densest / config.training.seq_len, f"densest example of {path.name}"
    return DEFAULT_TRAINED_FRACTION, "assumed (no data file)"


def _activation_bytes(config, arch: Arch, ep: int, act: int, attention: str, loss: str,
                      fraction: float) -> dict[str, float]:
    """Activation bytes at the step's peak, by term: layers, attention scores, logits."""
    t = config.training
    tokens = t.micro_batch_size * t.seq_len
    h, i, k = arch.hidden, arch.intermediate, arch.top_k
    qkv = (arch.heads + 2 * arch.kv_heads) * arch.head_dim
    attn = (2 * h + qkv + arch.heads * arch.head_dim + h) * act + arch.heads * 4  # + softmax lse (fp32)
    moe = h * act + arch.experts * 4 + k * (h + 2 * i + i + h + 2 * config.lora.r) * act
    if ep > 1:
        moe += 2 * k * h * act  # all-to-all send/receive buffers
    per_layer = tokens * (attn + moe)
    # eager: softmax over [scores | sink] per layer, B x heads x S x (S+1) in the compute dtype
    scores = t.micro_batch_size * arch.heads * t.seq_len * (t.seq_len + 1) * act if attention == "eager" else 0
    if t.gradient_checkpointing:
        layers = arch.layers * tokens * h * act + per_layer  # layer inputs + one layer recomputed
        saved_scores = scores  # the recomputed layer's softmax
    else:
        layers = arch.layers * per_layer
        saved_scores = arch.layers * scores
    # logits for trained tokens only: fp32 log-softmax (saved), its gradient and the logits' gradient
    # (12 bytes per entry; +2 for the bf16 copy of that gradient); chunked/liger: one chunk of them.
    entry = 12 + (2 if act == 2 else 0)
    kept = fraction * tokens
    if loss in ("chunked", "liger"):
        kept = min(kept, max(16, LOSS_CHUNK_BYTES // (4 * arch.vocab)))
    logits = kept * arch.vocab * entry
    # Peak: saved tensors of every layer, plus whichever is larger: the logits (start of backward) or
    # the temporaries of one layer's attention (during its forward/backward, logits already freed).
    transient = max(logits, EAGER_TRANSIENT_SCORES * scores)
    return {"layers": layers, "scores": saved_scores, "logits": logits, "transient": transient,
            "total": layers + saved_scores + transient, "logit_tokens": kept,
            # freed score temporaries the heap keeps: every layer's without checkpointing (kept softmaxes
            # sit between them), about two layers' under it (each recomputed layer reuses the last's holes)
            "score_temporaries": (2 if t.gradient_checkpointing else arch.layers) * EAGER_TRANSIENT_SCORES * scores,
            "logit_block": kept * arch.vocab * 4}


def make_plan(config, config_path, gpus: int | None = None, gpu_mem_gib: float = 80.0,
              device: str = "cuda") -> Plan:
    ep = config.parallel.expert_parallel_size
    world = gpus if gpus is not None else ep
    ep, dp = check_topology(config, world, config_path, "--gpus")
    name, arch = arch_of(config, config_path)
    notes = []

    if config.model.dtype == "auto":
        param_bytes = 2 if device == "cuda" else 4  # as resolve_dtype: bf16 on GPU, fp32 on CPU
    else:
        param_bytes = 4 if config.model.dtype == "fp32" else 2
    attention, loss = attention_in_use(config, device), loss_in_use(config, device)
    expert_format = expert_format_in_use(config, device)
    fraction, fraction_source = trained_fraction(config)

    experts_total = arch.layers * arch.expert_params_per_layer()
    dense = arch.dense_params()
    from ossforge.model.mxfp4 import expert_bytes as expert_weight_bytes

    expert_bytes = expert_weight_bytes(1, expert_format, param_bytes)  # per expert parameter
    w_expert = experts_total / ep * expert_bytes
    w_dense = dense * param_bytes
    mxfp4 = (expert_weight_bytes(experts_total / ep, "mxfp4") + dense * 2) / GIB

    lora_gpu, lora_total = _lora_params(config, arch, ep)
    zero = config.deepspeed.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    offload = (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
    if stage >= 3:
        notes.append("ZeRO-3 is not combined with expert parallelism here; estimated as ZeRO-2")
    # Dense LoRA is data-parallel over the world, expert LoRA over the expert-DP group: use the
    # smaller group (expert DP) so the estimate errs high.
    shard = dp if stage >= 1 else 1
    lora_b = lora_gpu * param_bytes
    optimizer_b = lora_gpu * (8 + (4 if param_bytes == 2 else 0)) / shard  # Adam m + v (+ fp32 master)
    grads_b = lora_gpu * (param_bytes + (4 if param_bytes == 2 else 0)) / (dp if stage >= 2 else 1)
    acts = _activation_bytes(config, arch, ep, param_bytes, attention, loss, fraction)
    act_b = acts["total"]

    # Load-time peak on the rank's device: all experts when the loader reads them before expert
    # parallelism drops the others; rank 0 of a preset also holds the serialised base/ it writes.
    # Each rank materialises only its own experts (model/local_experts.py), except that small presets
    # are built whole and then cut to the local experts.
    from ossforge.model.presets import WHOLE_BUILD_MAX_PARAMS

    built_whole = bool(config.model.preset) and experts_total + dense <= WHOLE_BUILD_MAX_PARAMS
    experts_loaded = experts_total if built_whole else experts_total / ep
    load_b = experts_loaded * expert_bytes + w_dense
    if config.model.preset and device == "cpu":
        load_b += min(experts_total * param_bytes + w_dense, 5 * GIB)  # safetensors bytes of one base/ shard

    optimizer_device = 0.0 if offload else optimizer_b
    # ZeRO-Offload keeps the fp32 master, both moments and fp32 gradients on the host; the device keeps
    # only the gradients in the compute dtype.
    host_optimizer_b = optimizer_b + lora_gpu * 4 / (dp if stage >= 2 else 1) if offload else 0.0
    if offload:
        grads_b = lora_gpu * param_bytes / (dp if stage >= 2 else 1)
    train_b = w_expert + w_dense + lora_b + optimizer_device + grads_b + act_b
    overhead_gib = OVERHEAD_GIB
    if device == "cpu":
        # (a launched rank's extra 0.3 GiB was DeepSpeed's start-up broadcast of the frozen base, now skipped)
        overhead_gib = CPU_PROCESS_GIB + cpu_heap_slack_gib(acts)
    train_gib = train_b / GIB + overhead_gib
    load_gib = load_b / GIB + (CPU_PROCESS_GIB if device == "cpu" else OVERHEAD_GIB)  # no training heap yet
    per_gpu = max(train_gib, load_gib)
    host = CPU_PROCESS_GIB + host_optimizer_b / GIB
    if device == "cpu":
        host = per_gpu
    elif built_whole:
        host += (experts_total + dense) * 4 / GIB  # small presets are initialised in fp32 on the host first
    # Per rank and optimizer step: dispatch + combine in forward, both again in backward (and once
    # more in the recomputed forward under checkpointing); (ep-1)/ep of the routed rows leave the rank.
    t = config.training.micro_batch_size * config.training.seq_len
    passes = 6 if config.training.gradient_checkpointing else 4
    a2a = passes * t * arch.top_k * arch.hidden * param_bytes * (ep - 1) / ep * arch.layers * config.training.grad_accum
    if not config.training.gradient_checkpointing and config.training.seq_len >= 4096:
        notes.append("seq_len >= 4096 without training.gradient_checkpointing: consider enabling it")
    if attention == "eager" and acts["transient"] > acts["logits"] and device == "cuda":
        notes.append("eager attention's S^2 scores dominate: training.attention: flex makes them linear in S")
    if load_gib > train_gib:
        notes.append("the load-time peak (all experts before expert parallelism drops them) sets the total")
    fits = per_gpu <= gpu_mem_gib
    if not fits and ep < arch.experts and mxfp4 < gpu_mem_gib and expert_format != "mxfp4":
        notes.append("does not fit in bf16; more expert parallelism or MXFP4 base weights would shrink it")
    return Plan(
        model=name, gpus=world, ep=ep, dp=dp, expert_dp=dp, gpu_mem_gib=gpu_mem_gib,
        total_params=experts_total + dense,
        weights_gib=round((w_expert + w_dense) / GIB, 2),
        weights_expert_gib=round(w_expert / GIB, 2), weights_dense_gib=round(w_dense / GIB, 2),
        weights_mxfp4_gib=round(mxfp4, 2),
        lora_params_per_gpu=lora_gpu, lora_params_total=lora_total, lora_gib=round(lora_b / GIB, 3),
        optimizer_gib=round(optimizer_device / GIB, 3), gradients_gib=round(grads_b / GIB, 3),
        activations_gib=round(act_b / GIB, 2), overhead_gib=round(overhead_gib, 2),
        per_gpu_gib=round(per_gpu, 2), fits=fits, zero_stage=stage,
        all_to_all_gib_per_step=round(a2a / GIB, 3), notes=notes,
        device=device, attention=attention, loss=loss, expert_format=expert_format,
        trained_fraction=round(fraction, 4), trained_fraction_source=fraction_source,
        logit_tokens=int(acts["logit_tokens"]), attention_scores_gib=round(acts["scores"] / GIB, 3),
        logits_gib=round(acts["logits"] / GIB, 3), load_peak_gib=round(load_gib, 2),
        host_gib_per_rank=round(host, 2), optimizer_offload=offload,
        host_optimizer_gib=round(host_optimizer_b / GIB, 2),
    )


def cpu_heap_slack_gib(acts: dict) -> float:
    """Heap a CPU rank keeps beyond its live tensors, with the glibc settings of ``finetune/host_memory.py``.

    No block is mmap'd and freed heap is not returned, so the score-sized temporaries of eager attention
    (3 per layer, allocated and freed in every forward, recomputation and backward) leave holes: those of
    every layer without checkpointing, about two layers' with it. The logits differ in size from step to
    step (trained tokens vary by row), so one freed fp32 logits block that a later, larger one does not
    fit in stays too: seen as a rise of exactly that block from step 1 to step 2. Calibrated, not
    derived: the layer counts fit the eight CPU runs of BENCHMARKS.md (plan vs measured), where the heap
    kept up to 2 GiB, more than glibc's trim threshold plus top pad (1.5 GiB): holes inside the heap are
    never trimmed.
    """
    return (acts["score_temporaries"] + acts["logit_block"]) / GIB


def format_plan(p: Plan, config) -> str:
    tr = config.training
    verdict = "FITS" if p.fits else "DOES NOT FIT"
    unit = "GPU" if p.device == "cuda" else "CPU rank (host RSS)"
    experts = f"experts {p.weights_expert_gib:.2f}" + (" MXFP4" if p.expert_format == "mxfp4" else "")
    lines = [
        f"model {p.model}: {p.total_params / 1e9:.2f}B params; layout {p.gpus} rank(s) = EP {p.ep} x DP {p.dp} "
        f"(expert-DP {p.expert_dp}), ZeRO stage {p.zero_stage}",
        f"per {unit} ({tr.micro_batch_size} x {tr.seq_len} tokens, checkpointing "
        f"{'on' if tr.gradient_checkpointing else 'off'}, attention {p.attention}, loss {p.loss}; "
        f"trained fraction {p.trained_fraction:.2f}, {p.trained_fraction_source}):",
        f"  weights      {p.weights_gib:8.2f} GiB  ({experts} + non-expert {p.weights_dense_gib:.2f}"
        + (")" if p.expert_format == "mxfp4" else f"; with MXFP4 experts {p.weights_mxfp4_gib:.2f})"),
        f"  lora         {p.lora_gib:8.3f} GiB  ({p.lora_params_per_gpu / 1e6:.1f}M params on this rank, "
        f"{p.lora_params_total / 1e6:.1f}M in total across the EP ranks)",
        f"  optimizer    {p.optimizer_gib:8.3f} GiB" + (f"  (offloaded: {p.host_optimizer_gib:.2f} GiB of host memory per rank)"
                                                    if p.optimizer_offload else ""),
        f"  gradients    {p.gradients_gib:8.3f} GiB",
        f"  activations  {p.activations_gib:8.2f} GiB  (attention scores kept {p.attention_scores_gib:.2f}, "
        f"logits of {p.logit_tokens} tokens {p.logits_gib:.2f})",
        f"  overhead     {p.overhead_gib:8.2f} GiB",
        f"  total        {p.per_gpu_gib:8.2f} GiB of {p.gpu_mem_gib:g} -> {verdict}  "
        f"(load-time peak {p.load_peak_gib:.2f})",
        f"host memory per rank: {p.host_gib_per_rank:.2f} GiB",
        f"all-to-all per rank and optimizer step: {p.all_to_all_gib_per_step:.2f} GiB",
    ]
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ossforge.finetune.config import load_config

    config = load_config(args.config, args.overrides, check_files=False)
    if args.gpu_mem_gib <= 0:
        raise UserError(f"{args.config}: --gpu-mem-gib: must be > 0")
    plan = make_plan(config, args.config, args.gpus, args.gpu_mem_gib, device=args.device)
    print(json.dumps(asdict(plan)) if args.json else format_plan(plan, config))
    return 0
