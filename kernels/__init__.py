"""Triton kernels for the gpt-oss MoE path, each beside its pure-torch reference."""
