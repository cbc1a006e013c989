"""Triton kernels for the gpt-oss MoE path, each beside its pure-torch reference.

  routing.py       sort token slots by expert, offsets, tile table (torch ops, no host syncs)
  reference.py     torch grouped GEMMs (the reference semantics and the CPU fast path)
  grouped_gemm.py  the same primitives in Triton (gather prologue, LoRA + bias + SwiGLU epilogue)
  moe_lora.py      the autograd Function: forward, and a backward with no base dW for frozen experts
  bench.py         ``ossforge bench moe``

Import ``grouped_gemm`` only through ``moe_lora`` (it imports triton; set TRITON_INTERPRET=1 before that to
run the kernels on CPU).
"""
