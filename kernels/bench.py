"""ossforge bench moe: one gpt-oss MoE layer with expert LoRA, forward + backward, three ways in one run.

  ossforge                    fuse_moe'd layer (torch grouped path on CPU, Triton on CUDA)
  transformers grouped_mm     config._experts_implementation="grouped_mm", peft ParamWrapper LoRA
  transformers eager          config._experts_implementation="eager", peft ParamWrapper LoRA

All three share the same parameters (base frozen, LoRA trainable with non-zero B) and inputs; the run
checks that ossforge's output and gradients match grouped_mm's, then reports median ms per fwd+bwd,
speedup, peak memory (CUDA), achieved TFLOP/s and the percentage of a dense matmul with the same FLOPs
timed in the same run.

examples:
  ossforge bench moe --device cpu                       # E=32 k=4 H=I=256 T=2048 r=8 fp32
  ossforge bench moe --device cuda --shape 120b --json bench-120b.json
  ossforge bench moe --shape tiny --json /tmp/moe.json  # seconds, for CI
  ossforge bench moe --expert-format mxfp4 --device cuda --shape 20b   # + the MXFP4-resident layer

With ``--expert-format mxfp4`` the experts are MXFP4-quantised once; the run adds ``ossforge_mxfp4`` (the
layer with packed experts, decoded inside the grouped GEMMs) and the other variants run on the dequantised
(bf16) weights, so all of them compute the same function. Peak memory is measured on CUDA; on CPU the
table reports the resident expert-weight bytes of each variant.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from ossforge import atomic
from ossforge.errors import UserError

# name -> (experts, top_k, hidden, intermediate, tokens)
SHAPES = {
    "tiny": (8, 2, 48, 40, 64),
    "tiny-mxfp4": (8, 2, 64, 64, 64),  # MXFP4 needs hidden and intermediate in multiples of 32
    "cpu": (32, 4, 256, 256, 2048),
    "20b": (32, 4, 2880, 2880, 16384),
    "120b": (128, 4, 2880, 2880, 16384),
}
VARIANTS = ("ossforge", "grouped_mm", "eager")


def add_arguments(p):
    """``bench moe`` (this module) and ``bench train`` (:mod:`ossforge.finetune.bench_train`)."""
    from ossforge.finetune import bench_train

    sub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    for name, module, text in (("moe", None, "one MoE layer fwd+bwd vs transformers + peft"),
                               ("train", bench_train, "whole LoRA training steps vs the stock transformers + peft path")):
        doc = (module.__doc__ if module else __doc__).strip()
        q = sub.add_parser(name, help=text, description=doc, formatter_class=p.formatter_class)
        (module.add_arguments if module else add_moe_arguments)(q)


def add_moe_arguments(p):
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="layer preset (default: cpu on --device cpu, 20b on cuda)")
    p.add_argument("--tokens", type=int, default=None, help="override the number of tokens T")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (alpha = 2r)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 10 cpu, 20 cuda)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--skip", action="append", default=[], choices=VARIANTS,
                   help="leave a variant out (repeatable); ossforge always runs")
    p.add_argument("--expert-format", choices=["bf16", "mxfp4"], default="bf16",
                   help="mxfp4: also time the layer with MXFP4-resident experts (others on the dequantised weights)")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the results as JSON")


def run(args) -> int:
    if args.what == "train":
        from ossforge.finetune import bench_train

        return bench_train.run(args)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device: cuda requested but torch sees no CUDA device")
    shape = args.shape or ("cpu" if args.device == "cpu" else "20b")
    experts, top_k, hidden, inter, tokens = SHAPES[shape]
    tokens = args.tokens or tokens
    if tokens <= 0 or args.rank <= 0:
        raise UserError("--tokens/--rank: must be positive")
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    iters = args.iters if args.iters is not None else (10 if args.device == "cpu" else 20)
    if iters < 1 or args.warmup < 0:
        raise UserError("--iters/--warmup: need --iters >= 1 and --warmup >= 0")
    if args.json_out and not os.path.isdir(os.path.dirname(os.path.abspath(args.json_out))):
        raise UserError(f"--json: {args.json_out}: its folder does not exist")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.skip and "ossforge" in args.skip:
        raise UserError("--skip: ossforge always runs")
    if args.expert_format == "mxfp4" and (hidden % 32 or inter % 32):
        raise UserError(f"--expert-format: mxfp4 needs hidden and intermediate sizes that are multiples of 32 "
                        f"(--shape {shape} has {hidden} and {inter}; try --shape tiny-mxfp4)")
    result = bench_moe(experts, top_k, hidden, inter, tokens, args.rank, dtype, torch.device(args.device),
                       iters, args.warmup, [v for v in VARIANTS if v not in args.skip],
                       expert_format=args.expert_format)
    result["shape"] = shape
    print(format_table(result))
    if args.json_out:
        atomic.write_text(args.json_out, json.dumps(result, indent=2))
    return 0


def _build_layer(experts, top_k, hidden, inter, rank, dtype, device, seed=0):
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    config = GptOssConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                          num_experts_per_tok=top_k)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = GptOssMLP(config)

    # Built and initialised on the device: the 120b layer is 12 GiB in fp32.
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):
        layer = Layer()
    for p in layer.parameters():
        p.data.normal_(0.0, hidden ** -0.5, generator=gen)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    layer = inject_adapter_in_model(lora, layer)
    layer = layer.to(device=device, dtype=dtype)
    return layer, config


def _flops(tokens, top_k, hidden, inter, rank):
    """Useful FLOPs of one fwd+bwd with frozen experts: GEMMs forward and dX backward, LoRA fwd + 2 bwd."""
    slots = tokens * top_k
    base = 2 * slots * hidden * 2 * inter + 2 * slots * inter * hidden
    lora = 2 * slots * rank * (hidden + 2 * inter) + 2 * slots * rank * (inter + hidden)
    return 2 * base + 3 * lora


def _timeit(fn, iters, warmup, device):
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, min(times) * 1e3


def _mxfp4_layers(layer, dtype):
    """Quantise ``layer``'s experts to MXFP4 in place (dense, dequantised) and return a copy holding them packed."""
    import copy

    import torch

    from ossforge.model.fused_moe import _unwrap_experts, fuse_moe
    from ossforge.model.mxfp4 import fake_quantize_mxfp4, quantize_mxfp4
    from ossforge.model.mxfp4_experts import install_mxfp4_expert_weight

    dense = _unwrap_experts(layer.mlp.experts)[0]
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            param = getattr(dense, name)
            param.copy_(fake_quantize_mxfp4(param))
    packed_layer = copy.deepcopy(layer)
    packed = _unwrap_experts(packed_layer.mlp.experts)[0]
    for name in ("gate_up_proj", "down_proj"):
        with torch.no_grad():
            blocks, scales = quantize_mxfp4(getattr(packed, name))  # the exact bytes: values are representable
        install_mxfp4_expert_weight(packed, name, blocks, scales, dtype)
    return fuse_moe(packed_layer)


def bench_moe(experts, top_k, hidden, inter, tokens, rank, dtype, device, iters=10, warmup=2,
              variants=VARIANTS, expert_format="bf16"):
    import torch

    from ossforge.kernels.moe_lora import resolve_backend
    from ossforge.model.fused_moe import fuse_moe, unfuse_moe
    from ossforge.model.mxfp4_experts import resident_expert_bytes

    layer, config = _build_layer(experts, top_k, hidden, inter, rank, dtype, device)
    layers = {}
    if expert_format == "mxfp4":
        layers["ossforge_mxfp4"] = _mxfp4_layers(layer, dtype)
        variants = ["ossforge_mxfp4", *variants]
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, tokens, hidden, generator=gen, device=device).to(dtype).requires_grad_()
    grad_out = torch.randn(1, tokens, hidden, generator=gen, device=device).to(dtype)
    trainable = {}
    for name in variants:
        lyr = layers.get(name, layer)
        trainable[name] = [p for p in lyr.parameters() if p.requires_grad]
    current = ["ossforge"]

    def step():
        x.grad = None
        for p in trainable[current[0]]:
            p.grad = None
        out, _ = layers.get(current[0], layer).mlp(x)
        out.backward(grad_out)
        return out

    def setup(variant):
        current[0] = variant
        if variant in layers:
            return
        unfuse_moe(layer)
        if variant == "ossforge":
            fuse_moe(layer)
        else:
            config._experts_implementation = variant

    # One pass per variant for results and peak memory, then timed rounds that interleave the variants so
    # that load from other processes hits all of them alike.
    rows, outputs = {}, {}
    for variant in variants:
        setup(variant)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
        out = step().detach()
        outputs[variant] = [out.float()] + [t.grad.float().clone() for t in [x] + trainable[variant]]
        rows[variant] = {"expert_weights_mib": round(resident_expert_bytes(layers.get(variant, layer)) / 2**20, 3)}
        if device.type == "cuda":
            torch.cuda.synchronize()
            rows[variant]["peak_mem_gib"] = round((torch.cuda.max_memory_allocated() - base_mem) / 2**30, 3)
        for _ in range(warmup):
            step()
    times = {v: [] for v in variants}
    for _ in range(iters):
        for variant in variants:
            setup(variant)
            times[variant].append(_timeit(step, 1, 0, device)[0])
    for variant in variants:
        rows[variant]["ms"] = round(statistics.median(times[variant]), 3)
        rows[variant]["min_ms"] = round(min(times[variant]), 3)
    unfuse_moe(layer)

    gemm = _grouped_gemm_throughput(layer, x.detach()[0], dtype, device, iters, warmup)
    flops = _flops(tokens, top_k, hidden, inter, rank)
    dense_ms = _dense_ms(flops, tokens * top_k, hidden, dtype, device, iters, warmup)
    dense_tflops = flops / dense_ms / 1e9
    for variant, row in rows.items():
        row["tflops"] = round(flops / row["ms"] / 1e9, 4)
        row["pct_dense"] = round(100 * row["tflops"] / dense_tflops, 1)
        if variant == "ossforge_mxfp4":
            row["time_vs_bf16_ossforge"] = round(row["ms"] / rows["ossforge"]["ms"], 3)
            if "grouped_mm" in rows:
                row["speedup_vs_grouped_mm"] = round(rows["grouped_mm"]["ms"] / row["ms"], 3)
        elif variant != "ossforge":
            row["ossforge_speedup"] = round(row["ms"] / rows["ossforge"]["ms"], 3)
            if "peak_mem_gib" in row and row["peak_mem_gib"] > 0:
                row["ossforge_mem_ratio"] = round(rows["ossforge"]["peak_mem_gib"] / row["peak_mem_gib"], 3)
    reference = "grouped_mm" if "grouped_mm" in outputs else next((v for v in outputs if v != "ossforge"), None)
    max_rel = None
    if reference is not None:
        max_rel = _max_rel(outputs["ossforge"], outputs[reference])
    mxfp4_rel = _max_rel(outputs["ossforge_mxfp4"], outputs["ossforge"]) if "ossforge_mxfp4" in outputs else None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "experts": experts, "top_k": top_k, "hidden": hidden, "intermediate": inter,
        "tokens": tokens, "rank": rank, "iters": iters, "threads": torch.get_num_threads(),
        "backend": resolve_backend(device),
        "flops_per_step": flops,
        "dense_matmul": {"ms": round(dense_ms, 3), "tflops": round(dense_tflops, 4)},
        "grouped_gemm": gemm,
        "results": rows,
        "max_rel_diff_vs": reference,
        "max_rel_diff": max_rel,
        "expert_format": expert_format,
        "mxfp4_max_rel_diff_vs_bf16_ossforge": mxfp4_rel,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _max_rel(got, want):
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(got, want))


def _grouped_gemm_throughput(layer, x, dtype, device, iters, warmup):
    """The gate/up grouped GEMM alone (gather + bias + LoRA + SwiGLU epilogue) vs a dense matmul of its shape."""
    import torch

    from ossforge.kernels.moe_lora import _ops, lora_views, resolve_backend
    from ossforge.kernels.reference import LoraFactors
    from ossforge.kernels.routing import sort_by_expert
    from ossforge.model.fused_moe import _expert_lora, _unwrap_experts

    experts, wrappers = _unwrap_experts(layer.mlp.experts)
    ops = _ops(resolve_backend(device))
    a_w, b_w, scaling = _expert_lora(wrappers["gate_up_proj"])
    num_experts = experts.gate_up_proj.shape[0]
    a, b = lora_views(a_w.to(dtype), b_w.to(dtype), num_experts)
    lora = LoraFactors(a.transpose(1, 2), b.transpose(1, 2), scaling)
    with torch.no_grad():
        _, _, index = layer.mlp.router(x)
        routing = sort_by_expert(index, num_experts)
        w, bias = experts.gate_up_proj, experts.gate_up_proj_bias

        def gemm():
            return ops.expert_matmul(x, w, routing, gather=True, bias=bias, lora=lora, swiglu_out=True)

        ms, _ = _timeit(gemm, iters, warmup, device)
        rows = index.numel()
        dense_a = torch.randn(rows, w.shape[1], device=device, dtype=dtype)
        dense_ms, _ = _timeit(lambda: dense_a @ w[0], iters, warmup, device)
    flops = 2 * rows * w.shape[1] * w.shape[2]
    return {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 4),
            "dense_same_shape_tflops": round(flops / dense_ms / 1e9, 4),
            "pct_dense": round(100 * dense_ms / ms, 1)}


def _dense_ms(flops, rows, hidden, dtype, device, iters, warmup):
    """Time one dense ``[rows, hidden] @ [hidden, n]`` matmul with the layer's FLOPs."""
    import torch

    n = max(1, round(flops / (2 * rows * hidden)))
    a = torch.randn(rows, hidden, device=device, dtype=dtype)
    b = torch.randn(hidden, n, device=device, dtype=dtype)
    median_ms, _ = _timeit(lambda: a @ b, iters, warmup, device)
    return median_ms * (flops / (2 * rows * hidden * n))


def device_name(device):
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cpus)"


def format_table(result) -> str:
    lines = [
        f"MoE layer fwd+bwd  E={result['experts']} k={result['top_k']} H={result['hidden']} "
        f"I={result['intermediate']} T={result['tokens']} r={result['rank']} {result['dtype']} on {result['device']}",
        f"dense matmul of equal FLOPs: {result['dense_matmul']['ms']:.2f} ms "
        f"({result['dense_matmul']['tflops']:.3f} TFLOP/s)",
        f"{'variant':<15}{'ms':>10}{'TFLOP/s':>10}{'% dense':>9}{'ossforge x':>12}{'peak GiB':>10}{'experts MiB':>13}",
    ]
    for name, row in result["results"].items():
        speed = f"{row['ossforge_speedup']:.2f}" if "ossforge_speedup" in row else "-"
        if "time_vs_bf16_ossforge" in row:
            speed = f"1/{row['time_vs_bf16_ossforge']:.2f}"
        mem = f"{row['peak_mem_gib']:.2f}" if "peak_mem_gib" in row else "-"
        lines.append(f"{name:<15}{row['ms']:>10.2f}{row['tflops']:>10.3f}{row['pct_dense']:>9.1f}{speed:>12}{mem:>10}"
                     f"{row['expert_weights_mib']:>13.3f}")
    g = result["grouped_gemm"]
    lines.append(f"gate/up grouped GEMM alone: {g['ms']:.2f} ms, {g['tflops']:.3f} TFLOP/s = {g['pct_dense']:.1f}% "
                 f"of a dense matmul of the same shape ({g['dense_same_shape_tflops']:.3f} TFLOP/s)")
    if result.get("mxfp4_max_rel_diff_vs_bf16_ossforge") is not None:
        lines.append(f"max relative difference ossforge_mxfp4 vs ossforge on the dequantised weights: "
                     f"{result['mxfp4_max_rel_diff_vs_bf16_ossforge']:.2e}")
    if result["max_rel_diff"] is not None:
        lines.append(f"max relative difference ossforge vs {result['max_rel_diff_vs']}: {result['max_rel_diff']:.2e}")
    return "\n".join(lines)
