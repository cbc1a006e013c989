"""MXFP4 expert weights as the grouped GEMMs see them: packed blocks + scales, decoded per expert.

:class:`MXFP4Weight` stands where the kernels take a dense ``W [E, K, N]``: it keeps the published layout
(``blocks [E, out, in/32, 16]`` uint8, ``scales [E, out, in/32]`` uint8 E8M0, groups of 32 along the input
dim) and a ``transposed`` flag, so ``W`` (forward, K = in) and ``W^T`` (the dX GEMMs, K = out) are the same
bytes. ``w[e]`` is the pure-torch reference decode of one expert (what the torch backend multiplies with,
one expert at a time, so host memory holds the packed experts plus one dense expert); the Triton kernels
decode the same bytes inside their K loop (``grouped_gemm._expert_matmul_kernel`` with ``MXFP4=True``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ossforge.model.mxfp4 import FP4_VALUES, GROUP, dequantize_mxfp4


@dataclass(frozen=True)
class MXFP4Weight:
    """Frozen packed expert weight; ``shape`` is the logical ``[E, K, N]`` of the GEMM operand."""

    blocks: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype
    transposed: bool = False

    @property
    def shape(self) -> torch.Size:
        experts, out, groups, _ = self.blocks.shape
        fan_in = groups * GROUP
        return torch.Size((experts, out, fan_in) if self.transposed else (experts, fan_in, out))

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def transpose(self, dim0: int, dim1: int) -> "MXFP4Weight":
        """Only the expert matrix can be transposed (``w.transpose(1, 2)``, as for a dense ``[E, K, N]``)."""
        if {dim0 % 3, dim1 % 3} != {1, 2}:
            raise ValueError(f"MXFP4Weight.transpose: only dims (1, 2), got ({dim0}, {dim1})")
        return replace(self, transposed=not self.transposed)

    def __getitem__(self, expert: int) -> torch.Tensor:
        """Dense ``[K, N]`` of one expert (reference decode, exact in any float dtype >= bf16)."""
        w = dequantize_mxfp4(self.blocks[expert:expert + 1], self.scales[expert:expert + 1], self.dtype)[0]
        return w.t() if self.transposed else w

    def dequantize(self) -> torch.Tensor:
        """All experts dense (tests and fallbacks only: this is the memory the format saves)."""
        w = dequantize_mxfp4(self.blocks, self.scales, self.dtype)
        return w.transpose(1, 2) if self.transposed else w

    def nbytes(self) -> int:
        return self.blocks.numel() * self.blocks.element_size() + self.scales.numel() * self.scales.element_size()


def fp4_lut(device) -> torch.Tensor:
    """The 16 e2m1 values in fp32: the table the Triton kernels index with each nibble."""
    return torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)
