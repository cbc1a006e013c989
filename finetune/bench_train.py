"""ossforge bench train: whole LoRA training steps (forward, backward, AdamW), ossforge vs the stock path.

One reduced-depth model with the real layer shapes and the real 201,088-token vocabulary is trained
two ways in the same process, alternating step by step so that load from elsewhere hits both alike:

  ossforge   fuse_moe'd experts (Triton on CUDA), ossforge's attention, loss on trained tokens only
             (``ossforge.finetune.trainer.compute_loss``)
  stock      what a TRL/PEFT user gets: transformers experts in grouped_mm mode, peft
             ``target_parameters`` expert LoRA, eager attention, full logits + the model's own loss

Both train the same parameters (frozen base, LoRA r on q/k/v/o and every expert), so their initial
losses agree (checked). Reported per path: median step time, tokens/s, model TFLOP/s, % of a dense
matmul timed in the same run, peak memory (CUDA max_memory_allocated; on CPU the peak RSS growth), and
with --gpu-mem-gib the longest sequence whose step fits (binary search, one step per probe).

Model FLOPs per step (frozen base, so no weight gradients except LoRA's):
  4 * N_active * T                 forward (2) + input gradients (2) of every matmul a token passes
                                   (attention projections, router, its top-k experts, LM head)
  + 6 * r * (in + out) * T         per adapted matrix: LoRA forward, input gradient, dA and dB
  + 12 * heads * head_dim * K * T  attention scores and values, forward (4) + backward (8); K the mean
                                   number of keys a query sees (causal; min(window) on sliding layers)
Recomputation under gradient checkpointing is not counted (it is overhead, not model work).

examples:
  ossforge bench train --shape tiny --device cpu --json /tmp/train.json      # seconds, for CI
  ossforge bench train --shape 20b --layers 2 --seq 4096 --gpu-mem-gib 80
  ossforge bench train --shape 120b --layers 2 --seq 4096 --json bench-train-120b.json
"""

from __future__ import annotations

import json
import os
import statistics
import time

from ossforge import atomic
from ossforge.errors import UserError
from ossforge.kernels.bench import device_name

SHAPES = {"tiny": "tiny", "20b": "gpt-oss-20b", "120b": "gpt-oss-120b"}
PATHS = ("ossforge", "stock")
GIB = 2**30


def add_arguments(p):
    p.add_argument("--shape", choices=sorted(SHAPES), required=True,
                   help="layer shapes: gpt-oss-20b, gpt-oss-120b or the tiny preset")
    p.add_argument("--layers", type=int, default=None, help="layers to build (default: 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 4096 on cuda, 128 on cpu)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r (alpha = 2r)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--steps", type=int, default=None, help="timed steps per path (default 3 cpu, 5 cuda)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per path first (default 1)")
    p.add_argument("--no-checkpointing", action="store_true", help="train without gradient checkpointing")
    p.add_argument("--gpu-mem-gib", type=float, default=None, metavar="M",
                   help="also find the longest sequence whose step peaks within M GiB, per path")
    p.add_argument("--max-seq", type=int, default=None,
                   help="upper end of that search (default 262144 on cuda, 1024 on cpu)")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the results as JSON")


def run(args) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device: cuda requested but torch sees no CUDA device")
    from ossforge.model.presets import PRESETS

    full_layers = PRESETS[SHAPES[args.shape]]["num_hidden_layers"]
    layers = args.layers if args.layers is not None else 2
    if not 1 <= layers <= full_layers:
        raise UserError(f"--layers: must be between 1 and {full_layers} for {args.shape}, got {layers}")
    seq = args.seq or (4096 if device == "cuda" else 128)
    steps = args.steps if args.steps is not None else (5 if device == "cuda" else 3)
    if seq < 8 or args.micro_batch < 1 or args.rank < 1 or steps < 1 or args.warmup < 0:
        raise UserError("--seq/--micro-batch/--rank/--steps/--warmup: need seq >= 8, the others >= 1 (warmup >= 0)")
    if args.gpu_mem_gib is not None and args.gpu_mem_gib <= 0:
        raise UserError("--gpu-mem-gib: must be positive")
    if args.json_out and not os.path.isdir(os.path.dirname(os.path.abspath(args.json_out))):
        raise UserError(f"--json: {args.json_out}: its folder does not exist")
    dtype = getattr(torch, args.dtype or ("float32" if device == "cpu" else "bfloat16"))
    max_seq = args.max_seq or (262144 if device == "cuda" else 1024)
    result = bench_train(args.shape, layers, seq, args.micro_batch, args.rank, dtype, torch.device(device),
                         steps, args.warmup, checkpointing=not args.no_checkpointing,
                         gpu_mem_gib=args.gpu_mem_gib, max_seq=max_seq)
    print(format_table(result))
    if args.json_out:
        atomic.write_text(args.json_out, json.dumps(result, indent=2))
    return 0


# ----------------------------------------------------------------------------- the two paths


def stock_loss(model, batch):
    """What TRL's SFTTrainer computes: the model's own loss over full logits."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                 use_cache=False).loss


def stock_experts() -> str:
    """transformers' grouped_mm experts where this transformers has them, else its eager loop."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return "eager"
    return "grouped_mm" if "grouped_mm" in ALL_EXPERTS_FUNCTIONS else "eager"


def use_path(model, path: str, device):
    """Switch the (peft) model to one path in place; returns (loss function, description)."""
    from ossforge.model.fused_moe import fuse_moe, unfuse_moe

    config = model.config
    unfuse_moe(model)
    config._experts_implementation = stock_experts()
    if path == "ossforge":
        fuse_moe(model)
        from ossforge.finetune.trainer import apply_kernels, compute_loss

        attention, loss_name = apply_kernels(model)  # training.attention / training.loss: auto
        return compute_loss, {"experts": "ossforge.model.fuse_moe", "attention": attention,
                              "loss": f"{loss_name} LM-head loss over trained tokens (trainer.compute_loss)"}
    from ossforge.model.attention import apply_attention

    apply_attention(model, "eager")
    return stock_loss, {"experts": f"transformers {config._experts_implementation} + peft ParamWrapper",
                        "attention": "eager", "loss": "full logits (model loss)"}


# ----------------------------------------------------------------------------- model, data, FLOPs


def build_model(shape: str, layers: int, rank: int, dtype, device, checkpointing: bool, seed: int = 0):
    """Reduced-depth gpt-oss of the real shapes and vocabulary, with ossforge's LoRA (attention + experts)."""
    import torch
    from transformers import GptOssForCausalLM

    from ossforge.finetune.config import LoraConfig
    from ossforge.finetune.lora import apply_lora
    from ossforge.model.presets import PRESETS, make_config

    preset = SHAPES[shape]
    config = make_config(preset, num_hidden_layers=layers, layer_types=PRESETS[preset]["layer_types"][:layers])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype on the device: no fp32 copy of a 120b layer
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
            torch.manual_seed(seed)
            model = GptOssForCausalLM(config)
            model = apply_lora(model, LoraConfig(r=rank, alpha=2 * rank))
            # B starts non-zero so that the initial-loss check compares the LoRA paths too.
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.data.normal_(0.0, 1e-2)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(device=device, dtype=dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def make_batch(micro_batch: int, seq: int, vocab: int, device, seed: int = 1) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (micro_batch, seq), generator=gen)
    return {"input_ids": ids.to(device), "labels": ids.clone().to(device),
            "attention_mask": torch.ones_like(ids).to(device)}


def step_flops(config, micro_batch: int, seq: int, rank: int, targets=("q_proj", "k_proj", "v_proj", "o_proj")) -> int:
    """Model FLOPs of one LoRA step with a frozen base (formula in the module docstring)."""
    h, i, e, k = config.hidden_size, config.intermediate_size, config.num_local_experts, config.num_experts_per_tok
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
    per_layer = sum(a * b for a, b in shapes.values()) + h * e + k * (h * 2 * i + i * h)
    tokens = micro_batch * seq
    n_active = config.num_hidden_layers * per_layer + config.vocab_size * h
    lora = sum(a + b for t, (a, b) in shapes.items() if t in targets) + k * ((h + 2 * i) + (i + h))
    flops = 4 * n_active * tokens + 6 * rank * lora * config.num_hidden_layers * tokens
    window = config.sliding_window or seq
    for kind in config.layer_types[: config.num_hidden_layers]:
        keys = sum(min(p + 1, window) for p in range(seq)) if kind == "sliding_attention" else seq * (seq + 1) // 2
        flops += 12 * config.num_attention_heads * config.head_dim * keys * micro_batch
    return int(flops)


# ----------------------------------------------------------------------------- memory and timing


class PeakMemory:
    """Peak memory of a region: CUDA max_memory_allocated, or on CPU the growth of the peak RSS (VmHWM,
    reset through /proc/self/clear_refs; without it ru_maxrss, which cannot be reset)."""

    def __init__(self, device):
        self.device = device
        self.method = "cuda max_memory_allocated" if device.type == "cuda" else self._cpu_method()

    @staticmethod
    def _cpu_method() -> str:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return "peak RSS growth (VmHWM)"
        except OSError:
            return "peak RSS growth (ru_maxrss, not resettable)"

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def start(self) -> int:
        """Reset the peak; returns the bytes in use now."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        if "VmHWM" in self.method:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return self._status("VmRSS")
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak(self) -> int:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if "VmHWM" in self.method:
            return self._status("VmHWM")
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def dense_matmul_tflops(dtype, device, iters: int = 5) -> dict:
    """A square dense matmul in the run's dtype: the device's achievable rate, measured beside the steps."""
    import torch

    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    return {"n": n, "ms": round(ms, 4), "tflops": round(2 * n**3 / ms / 1e9, 4)}


# ----------------------------------------------------------------------------- the benchmark


def bench_train(shape, layers, seq, micro_batch, rank, dtype, device, steps=3, warmup=1, checkpointing=True,
                gpu_mem_gib=None, max_seq=1024, seed=0) -> dict:
    import torch
    import transformers

    model = build_model(shape, layers, rank, dtype, device, checkpointing, seed)
    config = model.config
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    batch = make_batch(micro_batch, seq, config.vocab_size, device)
    memory = PeakMemory(device)

    def one_step(loss_fn, b):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, b)
        loss.backward()
        optimizer.step()
        return loss.detach()

    rows, described = {}, {}
    with torch.no_grad():  # same parameters, same batch: the two paths must agree before any update
        for path in PATHS:
            loss_fn, described[path] = use_path(model, path, device)
            rows[path] = {**described[path], "initial_loss": float(loss_fn(model, batch))}
    for path in PATHS:  # warm-up (kernels compiled, Adam state allocated), then one measured step
        loss_fn, _ = use_path(model, path, device)
        for _ in range(warmup):
            one_step(loss_fn, batch)
        base = memory.start()
        one_step(loss_fn, batch)
        peak = memory.peak()
        rows[path]["peak_gib"] = round(peak / GIB, 3) if device.type == "cuda" else None
        rows[path]["peak_above_start_gib"] = round(max(0, peak - base) / GIB, 3)
    times = {path: [] for path in PATHS}
    losses = {path: [] for path in PATHS}
    for _ in range(steps):
        for path in PATHS:
            loss_fn, _ = use_path(model, path, device)
            _sync(device)
            t0 = time.perf_counter()
            loss = one_step(loss_fn, batch)
            _sync(device)
            times[path].append(time.perf_counter() - t0)
            losses[path].append(float(loss))

    dense = dense_matmul_tflops(dtype, device)
    tokens = micro_batch * seq
    flops = step_flops(config, micro_batch, seq, rank)
    for path, row in rows.items():
        s = statistics.median(times[path])
        row.update(step_s=round(s, 4), min_step_s=round(min(times[path]), 4),
                   tokens_per_s=round(tokens / s, 1), tflops=round(flops / s / 1e12, 4),
                   pct_dense=round(100 * flops / s / 1e12 / dense["tflops"], 2), losses=losses[path])
    if gpu_mem_gib is not None:
        for path in PATHS:
            rows[path]["longest_seq"] = longest_sequence(model, optimizer, path, device, micro_batch, gpu_mem_gib,
                                                         max_seq, checkpointing, memory)
    ossforge, stock = rows["ossforge"], rows["stock"]
    key = "peak_gib" if device.type == "cuda" else "peak_above_start_gib"
    ratio = {"tokens_per_s": round(ossforge["tokens_per_s"] / stock["tokens_per_s"], 3)}
    if stock[key]:
        ratio["peak"] = round(ossforge[key] / stock[key], 3)
    init = [rows[p]["initial_loss"] for p in PATHS]
    return {
        "shape": shape, "preset": SHAPES[shape], "layers": layers,
        "full_layers": _full_layers(shape), "seq": seq, "micro_batch": micro_batch, "tokens_per_step": tokens,
        "rank": rank, "dtype": str(dtype).replace("torch.", ""), "device": device_name(device),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "gradient_checkpointing": checkpointing, "steps": steps, "warmup": warmup,
        "trainable_params": sum(p.numel() for p in trainable),
        "flops_per_step": flops,
        "flop_formula": "4*N_active*T + 6*r*(in+out)*T per adapted matrix + 12*heads*head_dim*K*T attention; "
                        "frozen base (no weight gradients), recompute not counted",
        "dense_matmul": dense, "memory_measure": memory.method,
        "initial_loss_rel_diff": abs(init[0] - init[1]) / max(abs(init[1]), 1e-12),
        "paths": rows, "ratio": ratio,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _full_layers(shape: str) -> int:
    from ossforge.model.presets import PRESETS

    return PRESETS[SHAPES[shape]]["num_hidden_layers"]


def missing_layer_bytes(model, tokens: int, checkpointing: bool) -> int | None:
    """Memory the layers left out of a reduced-depth model would add: their weights, LoRA weights +
    gradients + AdamW state (fp32 m, v), and under checkpointing their saved input (one hidden row per token).
    None without checkpointing, where per-layer activations are not this simple."""
    if not checkpointing:
        return None
    config = model.config
    layer0 = next(m for name, m in model.named_modules() if name.endswith("layers.0"))
    frozen = sum(p.numel() * p.element_size() for p in layer0.parameters() if not p.requires_grad)
    lora = sum(p.numel() * (2 * p.element_size() + 8) for p in layer0.parameters() if p.requires_grad)
    act = tokens * config.hidden_size * next(model.parameters()).element_size()
    extra = _full_layers_of(config) - config.num_hidden_layers
    return extra * (frozen + lora + act)


def _full_layers_of(config) -> int:
    from ossforge.model.presets import PRESETS

    for preset in SHAPES.values():
        arch = PRESETS[preset]
        if (arch["hidden_size"], arch["num_local_experts"], arch["num_attention_heads"]) == (
                config.hidden_size, config.num_local_experts, config.num_attention_heads):
            return arch["num_hidden_layers"]
    return config.num_hidden_layers


def longest_sequence(model, optimizer, path, device, micro_batch, gpu_mem_gib, max_seq, checkpointing, memory) -> dict:
    """Binary search over sequence lengths (multiples of ``unit``), one training step per probe: the longest
    whose peak fits in ``gpu_mem_gib`` at this depth, and at full depth (scaled per layer, see
    :func:`missing_layer_bytes`). On CPU the peak is the RSS growth of the step."""
    unit = 1024 if device.type == "cuda" else 64
    limit = gpu_mem_gib * GIB

    def probe(seq):
        loss_fn, _ = use_path(model, path, device)
        batch = make_batch(micro_batch, seq, model.config.vocab_size, device)
        try:
            base = memory.start()
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            optimizer.step()
            peak = memory.peak() if device.type == "cuda" else memory.peak() - base
        except Exception as exc:  # an OOM is "does not fit"; anything else is a real failure
            if not _is_oom(exc):
                raise
            peak = None
        finally:
            optimizer.zero_grad(set_to_none=True)
            batch = None
            if device.type == "cuda":
                import torch

                torch.cuda.empty_cache()
        return peak

    found = {"reduced_depth": 0, "full_depth": 0 if checkpointing else None}
    peaks = {}
    for depth in found:
        if found[depth] is None:
            continue
        lo, hi = 0, max(1, max_seq // unit)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            seq = mid * unit
            if seq not in peaks:
                peaks[seq] = probe(seq)
            peak = peaks[seq]
            if depth == "full_depth" and peak is not None:
                peak += missing_layer_bytes(model, micro_batch * seq, checkpointing)
            if peak is not None and peak <= limit:
                lo = mid
            else:
                hi = mid - 1
        found[depth] = lo * unit
    return {"gpu_mem_gib": gpu_mem_gib, "unit": unit, "max_seq": max_seq, **found,
            "probes": {str(s): (round(p / GIB, 3) if p is not None else "oom") for s, p in sorted(peaks.items())}}


def format_table(result) -> str:
    lines = [
        f"LoRA training step  {result['preset']} shapes, {result['layers']} of {result['full_layers']} layers, "
        f"seq {result['seq']} x mb {result['micro_batch']}, r={result['rank']}, {result['dtype']} on {result['device']}"
        f"{', checkpointing' if result['gradient_checkpointing'] else ''}",
        f"dense matmul {result['dense_matmul']['n']}^3: {result['dense_matmul']['tflops']:.3f} TFLOP/s; "
        f"model FLOPs/step {result['flops_per_step']:.3e}; memory: {result['memory_measure']}",
        f"{'path':<10}{'step s':>9}{'tokens/s':>11}{'TFLOP/s':>10}{'% dense':>9}{'peak GiB':>10}{'+GiB':>8}"
        f"{'loss0':>10}{'longest':>9}",
    ]
    for name, row in result["paths"].items():
        peak = f"{row['peak_gib']:.2f}" if row.get("peak_gib") is not None else "-"
        longest = row.get("longest_seq")
        longest = str(longest["full_depth"] if longest and longest["full_depth"] is not None
                      else (longest or {}).get("reduced_depth", "-"))
        lines.append(f"{name:<10}{row['step_s']:>9.3f}{row['tokens_per_s']:>11.1f}{row['tflops']:>10.3f}"
                     f"{row['pct_dense']:>9.1f}{peak:>10}{row['peak_above_start_gib']:>8.2f}"
                     f"{row['initial_loss']:>10.4f}{longest:>9}")
    for name, row in result["paths"].items():
        lines.append(f"  {name}: experts {row['experts']}; attention {row['attention']}; loss {row['loss']}")
    ratio = result["ratio"]
    mem = f", peak {ratio['peak']:.2f}x" if "peak" in ratio else ""
    lines.append(f"ossforge / stock: tokens/s {ratio['tokens_per_s']:.2f}x{mem}; "
                 f"initial losses differ by {result['initial_loss_rel_diff']:.1e} (relative)")
    return "\n".join(lines)
