"""MXFP4-resident experts: ``gate_up_proj`` / ``down_proj`` kept packed (4.25 bits per parameter) in the model.

An expert weight becomes a frozen :class:`MXFP4Tensor`: a tensor subclass with the parameter's logical shape
``[E, in, out]`` and dtype (so peft's ``ParamWrapper`` sizes its LoRA factors from it and the adapter files are
the bf16 model's), whose only storage is the published ``blocks`` / ``scales``. ``fuse_moe`` hands the packed
bytes to the MoE kernels, which decode them inside their GEMMs. Any other op on it (the stock transformers
forward, printing, a comparison) runs on a dense dequantised temporary; writes to it raise, since the packed
experts are frozen.

:func:`install_mxfp4_expert_weight` is the loader seam: ``(experts module, name, blocks, scales)`` -> the packed
parameter in place. :func:`quantize_experts_` quantises a model's dense experts once (random presets).
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from ossforge.model.mxfp4 import dequantize_mxfp4, quantize_mxfp4

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
EXPERT_FORMATS = ("auto", "bf16", "mxfp4")

_aten = torch.ops.aten


class MXFP4Tensor(torch.Tensor):
    """Frozen expert weight ``[E, in, out]`` stored as MXFP4 ``blocks [E, out, in/32, 16]`` + ``scales [E, out, in/32]``."""

    blocks: torch.Tensor
    scales: torch.Tensor

    @staticmethod
    def __new__(cls, blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
        experts, rows, groups, half = blocks.shape
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or tuple(scales.shape) != (experts, rows, groups):
            raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} / scales {tuple(scales.shape)} "
                             f"{scales.dtype} are not [E, rows, G, 16] / [E, rows, G] uint8")
        shape = (experts, groups * 2 * half, rows)
        self = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=blocks.device, requires_grad=False)
        self.blocks, self.scales = blocks, scales
        return self

    def __init__(self, *args, **kwargs):  # state lives in __new__
        super().__init__()

    def __repr__(self):
        return f"MXFP4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, packed_bytes={self.packed_nbytes()})"

    def packed_nbytes(self) -> int:
        return self.blocks.numel() + self.scales.numel()  # uint8

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_mxfp4(self.blocks, self.scales, dtype or self.dtype)

    def packed(self):
        """The kernels' view of it (:class:`ossforge.kernels.mxfp4.MXFP4Weight`)."""
        from ossforge.kernels.mxfp4 import MXFP4Weight

        return MXFP4Weight(self.blocks, self.scales, self.dtype)

    # nn.Module._apply (.to, .float, DeepSpeed's module.to) sets ``param.data = moved``: carry the packed bytes
    # along with the metadata. (Not a traceable wrapper subclass on purpose: _apply would then swap_tensors,
    # which refuses parameters that peft / DeepSpeed hold weak references to.)
    @property
    def data(self):
        return self.detach()

    @data.setter
    def data(self, new):
        if not isinstance(new, MXFP4Tensor):
            raise RuntimeError("MXFP4-resident expert weights are frozen: cannot assign dense data to them")
        torch._C.TensorBase.data.__set__(self, new)
        self.blocks, self.scales = new.blocks, new.scales

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (_aten.detach.default, _aten.alias.default):
            src = args[0]
            return MXFP4Tensor(src.blocks, src.scales, src.dtype)
        if func is _aten.clone.default:
            src = args[0]
            return MXFP4Tensor(src.blocks.clone(), src.scales.clone(), src.dtype)
        if func is _aten._to_copy.default:  # .to(device / dtype): move the bytes, keep the nominal dtype apart
            src = args[0]
            device = kwargs.get("device") or src.device
            return MXFP4Tensor(src.blocks.to(device), src.scales.to(device), kwargs.get("dtype") or src.dtype)
        if func is _aten.slice.Tensor and _slice_dim(args, kwargs) == 0:  # a run of experts (expert parallelism)
            src, start, end, step = _slice_args(args, kwargs)
            return MXFP4Tensor(src.blocks[start:end:step], src.scales[start:end:step], src.dtype)
        if func._schema.is_mutable and args and isinstance(args[0], MXFP4Tensor):
            raise RuntimeError(f"{func}: MXFP4-resident expert weights are frozen (load with "
                               "model.expert_format: bf16 to change them)")

        def dense(t):
            return t.dequantize() if isinstance(t, MXFP4Tensor) else t

        return func(*tree_map(dense, args), **tree_map(dense, kwargs))


def _slice_dim(args, kwargs) -> int:
    return args[1] if len(args) > 1 else kwargs.get("dim", 0)


def _slice_args(args, kwargs):
    """``aten.slice.Tensor(self, dim, start, end, step)`` arguments, defaults filled in."""
    full = list(args) + [None] * (5 - len(args))
    src, _, start, end, step = full[:5]
    start = kwargs.get("start", start)
    end = kwargs.get("end", end)
    step = kwargs.get("step", step) or 1
    return src, start, end, step


def install_mxfp4_expert_weight(experts: torch.nn.Module, name: str, blocks: torch.Tensor, scales: torch.Tensor,
                                dtype: torch.dtype | None = None) -> MXFP4Tensor:
    """Make ``experts.<name>`` (``gate_up_proj`` or ``down_proj``) the packed MXFP4 weight ``blocks``/``scales``.

    The loader seam: blocks/scales in the published layout (as in the safetensors files), already on the
    target device. ``dtype``: the nominal dtype the parameter reports (default: the current parameter's).
    Replaces a dense or meta parameter; each expert's ``[in, out]`` must match the one the config gives. The
    expert count may differ: a rank-sharded load (expert parallelism) installs only its share of the meta
    parameter's experts.
    """
    if name not in EXPERT_PARAMS:
        raise ValueError(f"expected one of {EXPERT_PARAMS}, got {name!r}")
    old = experts._parameters.get(name)
    packed = MXFP4Tensor(blocks, scales, dtype or (old.dtype if old is not None else torch.bfloat16))
    if old is not None and tuple(old.shape[1:]) != tuple(packed.shape[1:]):
        raise ValueError(f"{name}: MXFP4 blocks give experts of shape {tuple(packed.shape[1:])}, the model "
                         f"expects {tuple(old.shape[1:])}")
    experts._parameters[name] = torch.nn.Parameter(packed, requires_grad=False)
    return packed


def expert_modules(model: torch.nn.Module):
    """The ``GptOssExperts`` modules of ``model`` (plain or peft-wrapped)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    return [m for m in model.modules() if isinstance(m, GptOssExperts)]


def quantize_experts_(model: torch.nn.Module) -> torch.nn.Module:
    """Quantise every dense expert weight of ``model`` to MXFP4 and keep it packed, in place (one tensor at a time)."""
    for experts in expert_modules(model):
        for name in EXPERT_PARAMS:
            param = experts._parameters[name]
            if isinstance(param, MXFP4Tensor):
                continue
            with torch.no_grad():
                blocks, scales = quantize_mxfp4(param.detach())
            install_mxfp4_expert_weight(experts, name, blocks, scales, param.dtype)
    return model


def is_mxfp4_resident(model: torch.nn.Module) -> bool:
    return any(isinstance(p, MXFP4Tensor) for p in model.parameters())


def resident_expert_bytes(model: torch.nn.Module) -> int:
    """Bytes the expert ``gate_up_proj``/``down_proj`` weights actually hold (packed or dense): the storages
    they keep alive, each counted once, so a weight that is a view of a larger buffer (a whole checkpoint
    tensor when only a rank's experts are wanted) counts that buffer. Meta tensors count their own size."""
    storages: dict[tuple[int, int], int] = {}
    meta = 0
    for experts in expert_modules(model):
        for name in EXPERT_PARAMS:
            p = experts._parameters[name]
            for t in (p.blocks, p.scales) if isinstance(p, MXFP4Tensor) else (p,):
                if t.is_meta:
                    meta += t.numel() * t.element_size()
                    continue
                storage = t.untyped_storage()
                storages[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
    return meta + sum(storages.values())


def resolve_expert_format(name: str, *, folder_is_mxfp4: bool, device) -> str:
    """``model.expert_format`` -> ``bf16`` | ``mxfp4``: ``auto`` keeps MXFP4 only for MXFP4 folders trained on CUDA."""
    if name not in EXPERT_FORMATS:
        raise ValueError(f"expert_format must be one of {EXPERT_FORMATS}, got {name!r}")
    if name == "auto":
        return "mxfp4" if folder_is_mxfp4 and str(device).startswith("cuda") else "bf16"
    return name
