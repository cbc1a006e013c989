"""Compile every Triton kernel variant for an H100 (sm_90) target on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute; this checks that they lower through
Triton's real compiler and ptxas (shipped in the triton wheel), and reports registers-free resource use
(shared memory), so a GPU session does not start with a compile error. Run it without TRITON_INTERPRET:

    python -m ossforge.kernels.compile_check            # one config per variant, bf16
    python -m ossforge.kernels.compile_check --all      # every autotune config, bf16 and fp32
"""

from __future__ import annotations

import argparse
import os
import sys

# The variants moe_lora launches: forward gate/up, forward down, backward down (dSwiGLU), backward dX.
MATMUL_VARIANTS = {
    "gate_up": dict(GATHER=True, HAS_BIAS=True, HAS_LORA=True, SWIGLU=True),
    "down": dict(HAS_BIAS=True, HAS_LORA=True, ROW_SCALE=True, SCATTER=True),
    "down_backward": dict(GATHER=True, HAS_LORA=True, ROW_SCALE=True, DSWIGLU=True),
    "dx": dict(HAS_LORA=True, SCATTER=True),
    "gate_up_no_lora": dict(GATHER=True, HAS_BIAS=True, SWIGLU=True),
    "dx_no_lora": dict(SCATTER=True),
    # MXFP4-resident experts: W decoded from packed bytes in the K loop (W^T for the backward GEMMs)
    "gate_up_mxfp4": dict(GATHER=True, HAS_BIAS=True, HAS_LORA=True, SWIGLU=True, MXFP4=True),
    "down_mxfp4": dict(HAS_BIAS=True, HAS_LORA=True, ROW_SCALE=True, SCATTER=True, MXFP4=True),
    "down_backward_mxfp4": dict(GATHER=True, HAS_LORA=True, ROW_SCALE=True, DSWIGLU=True, MXFP4=True, W_TRANS=True),
    "dx_mxfp4": dict(HAS_LORA=True, SCATTER=True, MXFP4=True, W_TRANS=True),
}
TN_VARIANTS = {"gather_right": dict(GATHER_R=True), "gather_left": dict(GATHER_L=True)}
_INT_PTRS = {"tile_expert_ptr": "i32", "tile_start_ptr": "i64", "offsets_ptr": "i64", "rows_ptr": "i64",
             "perm_ptr": "i64", "part_ptr": "fp32", "wscale_ptr": "u8", "lut_ptr": "fp32"}


def _jit_fn(kernel):
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def compile_variant(kernel, constexprs: dict, dtype: str, num_warps: int, num_stages: int, arch: int = 90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_fn(kernel)
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            packed = name == "w_ptr" and constexprs.get("MXFP4")
            signature[name] = "*u8" if packed else "*" + _INT_PTRS.get(name, dtype)
        elif name in ("lora_scaling", "alpha", "limit"):
            signature[name] = "fp32"
        else:  # sizes and strides
            signature[name] = "i64" if name.startswith("s") else "i32"
    src = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every autotune config, bf16 and fp32")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET to compile for a GPU target", file=sys.stderr)
        return 2
    from ossforge.kernels import grouped_gemm as gg

    dtypes = ["bf16", "fp32"] if args.all else ["bf16"]
    mm_configs = gg._mm_configs() if args.all else gg._mm_configs()[:1]
    tn_configs = gg._tn_configs() if args.all else gg._tn_configs()[:1]
    defaults = dict(GATHER=False, SCATTER=False, HAS_BIAS=False, HAS_LORA=False, ROW_SCALE=False, SWIGLU=False,
                    DSWIGLU=False, MXFP4=False, W_TRANS=False, BLOCK_M=128, BLOCK_RANK=16)
    count = 0
    for dtype in dtypes:
        for name, variant in MATMUL_VARIANTS.items():
            for cfg in mm_configs:
                consts = dict(defaults, **variant, **cfg.kwargs, CAST_F32=dtype == "fp32")
                k = compile_variant(gg._expert_matmul_kernel, consts, dtype, cfg.num_warps, cfg.num_stages)
                print(f"expert_matmul {name:<16} {dtype} {cfg.kwargs} shared={k.metadata.shared} ok")
                count += 1
        for name, variant in TN_VARIANTS.items():
            for cfg in tn_configs:
                consts = dict(dict(GATHER_L=False, GATHER_R=False), **variant, **cfg.kwargs,
                              CAST_F32=dtype == "fp32")
                k = compile_variant(gg._expert_tn_kernel, consts, dtype, cfg.num_warps, cfg.num_stages)
                print(f"expert_tn     {name:<16} {dtype} {cfg.kwargs} shared={k.metadata.shared} ok")
                count += 1
    print(f"{count} kernel variants compiled for sm_90")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
