"""Counts the dense temporaries made from MXFP4-resident expert weights (``MXFP4Tensor.dequantize`` calls)."""

from __future__ import annotations

from ossforge.model.mxfp4_experts import MXFP4Tensor


class DequantiseCount:
    """``with DequantiseCount() as n: ...``; then ``n.calls``."""

    def __enter__(self):
        self.calls, self._original = 0, MXFP4Tensor.dequantize

        def counted(tensor, *args, **kwargs):
            self.calls += 1
            return self._original(tensor, *args, **kwargs)

        MXFP4Tensor.dequantize = counted
        return self

    def __exit__(self, *exc):
        MXFP4Tensor.dequantize = self._original
