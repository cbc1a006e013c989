"""Estimate per-GPU memory and the EP x DP layout of a config, before anything is allocated.

Pure arithmetic over the architecture (preset or the checkpoint's config.json) and the config:

  weights      frozen base: expert shard (experts / EP) + replicated non-expert params
  lora         trainable LoRA params (expert LoRA sharded like the experts)
  optimizer    Adam: fp32 master + two moments (ZeRO>=1 divides them over the DP group)
  gradients    one gradient per LoRA param (ZeRO>=2 divides them)
  activations  at training.micro_batch_size x training.seq_len, with or without
               training.gradient_checkpointing; memory-efficient attention (no seq^2 term);
               the logits over the 201k vocabulary (~16 bytes per token and vocab entry: logits,
               fp32 upcast, log-softmax, gradient), an upper bound when few tokens carry a loss
  overhead     CUDA context, NCCL buffers, allocator slack (a fixed allowance)

World size = --gpus (default: parallel.expert_parallel_size); DP = world / EP.
Examples:
  ossforge plan configs/medicine-120b-8xh100.yaml --gpus 8 --gpu-mem-gib 80
  ossforge plan configs/medicine-120b-2x8xh100.yaml --gpus 16 --json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ossforge.errors import UserError

GIB = 1024**3
OVERHEAD_GIB = 2.0  # CUDA context + NCCL + allocator fragmentation, per GPU
MXFP4_BITS = 4.25  # 4-bit values + one shared 8-bit scale per 32


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set parallel.expert_parallel_size=4")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="world size: GPUs over all nodes (default: parallel.expert_parallel_size)")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, metavar="M",
                   help="memory of one GPU in GiB (default 80, an H100)")
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


def _activation_bytes(config, arch: Arch, ep: int, param_bytes: int) -> float:
    """Saved activations for one micro-batch (forward kept for backward)."""
    t = config.training.micro_batch_size * config.training.seq_len
    h, i, k, a = arch.hidden, arch.intermediate, arch.top_k, param_bytes
    qkv = (arch.heads + 2 * arch.kv_heads) * arch.head_dim
    attn = (2 * h + qkv + arch.heads * arch.head_dim + h) * a + arch.heads * 4  # + softmax lse (fp32)
    moe = h * a + arch.experts * 4 + k * (h + 2 * i + i + h + 2 * config.lora.r) * a
    if ep > 1:
        moe += 2 * k * h * a  # all-to-all send/receive buffers
    per_layer_per_token = attn + moe
    if config.training.gradient_checkpointing:
        layers = arch.layers * h * a + per_layer_per_token  # layer inputs + one layer recomputed
    else:
        layers = arch.layers * per_layer_per_token
    # logits, their fp32 upcast and log-softmax, gradients: ~4 fp32 copies (measured on CPU, 1 x 2048 tokens)
    logits = arch.vocab * 16
    return t * (layers + logits)


def make_plan(config, config_path, gpus: int | None = None, gpu_mem_gib: float = 80.0) -> Plan:
    ep = config.parallel.expert_parallel_size
    world = gpus if gpus is not None else ep
    ep, dp = check_topology(config, world, config_path, "--gpus")
    name, arch = arch_of(config, config_path)
    notes = []

    param_bytes = 4 if config.model.dtype == "fp32" else 2  # auto: bf16 on GPU
    experts_total = arch.layers * arch.expert_params_per_layer()
    dense = arch.dense_params()
    w_expert = experts_total / ep * param_bytes
    w_dense = dense * param_bytes
    mxfp4 = (experts_total / ep * MXFP4_BITS / 8 + dense * 2) / GIB

    lora_gpu, lora_total = _lora_params(config, arch, ep)
    stage = int((config.deepspeed.get("zero_optimization") or {}).get("stage", 0))
    if stage >= 3:
        notes.append("ZeRO-3 is not combined with expert parallelism here; estimated as ZeRO-2")
    # Dense LoRA is data-parallel over the world, expert LoRA over the expert-DP group: use the
    # smaller group (expert DP) so the estimate errs high.
    shard = dp if stage >= 1 else 1
    lora_b = lora_gpu * param_bytes
    optimizer_b = lora_gpu * 12 / shard  # fp32 master + Adam m + v
    grads_b = lora_gpu * (param_bytes + (4 if param_bytes == 2 else 0)) / (dp if stage >= 2 else 1)
    act_b = _activation_bytes(config, arch, ep, param_bytes)

    per_gpu = (w_expert + w_dense + lora_b + optimizer_b + grads_b + act_b) / GIB + OVERHEAD_GIB
    # Per rank and optimizer step: dispatch + combine in forward, both again in backward (and once
    # more in the recomputed forward under checkpointing); (ep-1)/ep of the routed rows leave the rank.
    t = config.training.micro_batch_size * config.training.seq_len
    passes = 6 if config.training.gradient_checkpointing else 4
    a2a = passes * t * arch.top_k * arch.hidden * param_bytes * (ep - 1) / ep * arch.layers * config.training.grad_accum
    if not config.training.gradient_checkpointing and config.training.seq_len >= 4096:
        notes.append("seq_len >= 4096 without training.gradient_checkpointing: consider enabling it")
    fits = per_gpu <= gpu_mem_gib
    if not fits and ep < arch.experts and mxfp4 < gpu_mem_gib:
        notes.append("does not fit in bf16; more expert parallelism or MXFP4 base weights would shrink it")
    return Plan(
        model=name, gpus=world, ep=ep, dp=dp, expert_dp=dp, gpu_mem_gib=gpu_mem_gib,
        total_params=experts_total + dense,
        weights_gib=round((w_expert + w_dense) / GIB, 2),
        weights_expert_gib=round(w_expert / GIB, 2), weights_dense_gib=round(w_dense / GIB, 2),
        weights_mxfp4_gib=round(mxfp4, 2),
        lora_params_per_gpu=lora_gpu, lora_params_total=lora_total, lora_gib=round(lora_b / GIB, 3),
        optimizer_gib=round(optimizer_b / GIB, 3), gradients_gib=round(grads_b / GIB, 3),
        activations_gib=round(act_b / GIB, 2), overhead_gib=OVERHEAD_GIB,
        per_gpu_gib=round(per_gpu, 2), fits=fits, zero_stage=stage,
        all_to_all_gib_per_step=round(a2a / GIB, 3), notes=notes,
    )


def format_plan(p: Plan, config) -> str:
    tr = config.training
    verdict = "FITS" if p.fits else "DOES NOT FIT"
    lines = [
        f"model {p.model}: {p.total_params / 1e9:.2f}B params; layout {p.gpus} GPU(s) = EP {p.ep} x DP {p.dp} "
        f"(expert-DP {p.expert_dp}), ZeRO stage {p.zero_stage}",
        f"per GPU ({tr.micro_batch_size} x {tr.seq_len} tokens, checkpointing "
        f"{'on' if tr.gradient_checkpointing else 'off'}):",
        f"  weights      {p.weights_gib:8.2f} GiB  (experts {p.weights_expert_gib:.2f} + non-expert "
        f"{p.weights_dense_gib:.2f}; MXFP4 experts would be {p.weights_mxfp4_gib:.2f})",
        f"  lora         {p.lora_gib:8.3f} GiB  ({p.lora_params_per_gpu / 1e6:.1f}M of "
        f"{p.lora_params_total / 1e6:.1f}M params on this GPU)",
        f"  optimizer    {p.optimizer_gib:8.3f} GiB",
        f"  gradients    {p.gradients_gib:8.3f} GiB",
        f"  activations  {p.activations_gib:8.2f} GiB",
        f"  overhead     {p.overhead_gib:8.2f} GiB",
        f"  total        {p.per_gpu_gib:8.2f} GiB of {p.gpu_mem_gib:g} -> {verdict}",
        f"all-to-all per rank and optimizer step: {p.all_to_all_gib_per_step:.2f} GiB",
    ]
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ossforge.finetune.config import load_config

    config = load_config(args.config, args.overrides, check_files=False)
    if args.gpu_mem_gib <= 0:
        raise UserError(f"{args.config}: --gpu-mem-gib: must be > 0")
    plan = make_plan(config, args.config, args.gpus, args.gpu_mem_gib)
    print(json.dumps(asdict(plan)) if args.json else format_plan(plan, config))
    return 0
