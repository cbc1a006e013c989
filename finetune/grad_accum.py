"""fp32 gradient accumulation for bf16 training at ZeRO-0, where DeepSpeed has none.

With bf16 weights and ZeRO-0, DeepSpeed 0.19.8 runs ``DDP_BFLOAT16`` (``FP16_UnfusedOptimizer``): autograd
adds every micro-batch's gradient into the bf16 ``param.grad``, so each of ``grad_accum`` additions rounds
to 8 bits of mantissa and the error grows with the number of micro-batches. Its remedy,
``data_types.grad_accum_dtype: fp32``, raises ``NotImplementedError`` at stage 0 (ZeRO-1/2 accept it, and
:func:`ossforge.finetune.trainer.deepspeed_config` sets it there).

So at ZeRO-0 the micro-batches run under ``engine.no_sync()`` (no all-reduce), :meth:`stash` moves each
micro-batch's bf16 gradient into an fp32 buffer (exact), and after the last one :meth:`finish` writes the
fp32 sum back to ``param.grad`` -- one rounding per step instead of one per micro-batch -- and calls
``engine.allreduce_gradients()``, which reduces dense LoRA over the data-parallel group and expert LoRA
over its expert-data-parallel group exactly as ``engine.backward`` would have. The all-reduce itself runs
in fp32 (``communication_data_type``, set by ``deepspeed_config``). Both are public engine methods.
Extra memory: 4 bytes per trainable parameter, alive during the step.
"""

from __future__ import annotations

import torch


class FP32GradAccumulation:
    """Sums the trainable low-precision gradients of ``engine``'s micro-batches in fp32."""

    def __init__(self, engine):
        self.engine = engine
        model = getattr(engine, "module", engine)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buffers: dict[int, torch.Tensor] = {}

    @staticmethod
    def needed(engine, grad_accum: int) -> bool:
        """True for ZeRO-0 with low-precision trainable weights and more than one micro-batch per step."""
        if grad_accum <= 1 or engine.zero_optimization_stage() != 0:
            return False
        model = getattr(engine, "module", engine)
        return any(p.requires_grad and p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters())

    def backward(self, loss: torch.Tensor) -> None:
        """``engine.backward`` without its all-reduce, then the gradient moved into the fp32 sum."""
        with self.engine.no_sync():
            self.engine.backward(loss)
        self.stash()

    @torch.no_grad()
    def stash(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            total = self.buffers.get(i)
            if total is None:
                self.buffers[i] = p.grad.float()
            else:
                total.add_(p.grad)  # fp32 += bf16: exact promotion, one fp32 rounding
            p.grad = None

    @torch.no_grad()
    def finish(self) -> None:
        """The summed gradients back in ``param.grad`` (their own dtype), all-reduced as DeepSpeed would."""
        for i, total in self.buffers.items():
            p = self.params[i]
            p.grad = total.to(p.dtype)
        self.buffers.clear()
        self.engine.allreduce_gradients()

