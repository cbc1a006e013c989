"""Load and save gpt-oss checkpoints as Hugging Face model folders, offline.

- :func:`load_model` builds a ``GptOssForCausalLM`` from ``model.preset`` (random init, seeded) or
  ``model.path`` (a local folder: ``config.json`` + ``model.safetensors`` or shards listed in
  ``model.safetensors.index.json``). The model is built on the meta device and filled one tensor at
  a time; with ``expert_range`` (an expert-parallel rank's share) only those experts are read, as
  safetensors slices. Expert weights in the published MXFP4 format (``*_blocks``/``*_scales``) enter
  through :func:`load_mxfp4_experts` (dequantized by default). Never touches the Hub.
- :func:`architecture_for` gives the architecture without weights (for ``ossforge plan``).
- :func:`save_base` writes a random-init base as an HF folder, so an adapter trained on it can be
  loaded by anyone with stock transformers + peft.
- :func:`save_mxfp4_checkpoint` writes experts back in the published MXFP4 format.

Problems with a folder are :class:`UserError` naming the folder or file.
"""

from __future__ import annotations

import functools
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ossforge.atomic import directory as atomic_dir  # merge.py and tests use this name
from ossforge.errors import UserError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
EXPERT_WEIGHTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# The published checkpoints keep these in bf16 and quantize only the expert matrices.
MXFP4_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
DEFAULT_SHARD_BYTES = 5 * 1024**3


def resolve_dtype(name: str, device: str = "cpu"):
    """``model.dtype`` (``auto`` | ``bf16`` | ``fp32``) -> torch dtype; auto is bf16 on GPU, fp32 on CPU."""
    import torch

    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def load_model(model_cfg, *, dtype=None, device="cpu", expert_range=None):
    """``GptOssForCausalLM`` for a :class:`ossforge.finetune.config.ModelConfig`, in eval mode.

    ``dtype`` defaults to ``model_cfg.dtype`` resolved for ``device``. ``expert_range = (start, stop)``
    materialises only those global experts (an expert-parallel rank's share; see ``local_experts``).
    """
    from ossforge.model.mxfp4_experts import quantize_experts_, resolve_expert_format

    if dtype is None:
        dtype = resolve_dtype(getattr(model_cfg, "dtype", "auto"), device)
    requested = getattr(model_cfg, "expert_format", "bf16")
    if model_cfg.preset:
        from ossforge.model.presets import build_random

        model = build_random(model_cfg.preset, seed=model_cfg.init_seed, dtype=dtype, device=device,
                             expert_range=expert_range)
        if resolve_expert_format(requested, folder_is_mxfp4=False, device=device) == "mxfp4":
            quantize_experts_(model)  # random experts quantised once; training then sees exactly these
        return model.eval()
    fmt = folder_expert_format(requested, model_cfg.path, device)
    return load_folder(model_cfg.path, dtype=dtype, device=device, expert_range=expert_range, expert_format=fmt)


def folder_expert_format(choice: str, folder, device) -> str:
    """``model.expert_format`` for a model folder on ``device``: ``auto`` keeps MXFP4 experts packed
    only for a folder that stores them, on CUDA."""
    from ossforge.model.mxfp4_experts import resolve_expert_format

    return resolve_expert_format(choice, folder_is_mxfp4=bool(folder) and stores_mxfp4_experts(folder), device=device)


def stores_mxfp4_experts(folder) -> bool:
    """Whether the folder keeps its expert weights as MXFP4 ``*_blocks``/``*_scales``."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return False  # load_folder reports it
    try:
        return any(name.endswith("_blocks") for name in weight_files(folder))
    except UserError:  # config.json alone (plan before the download): load_folder reports it
        return False


def architecture_for(model_cfg) -> dict:
    """The architecture (``config.json`` keys) of ``model.preset`` or ``model.path``, reading no weights.

    A ``model.path`` folder needs only its ``config.json``; a folder that does not exist yet but is
    named like a preset (``.../gpt-oss-120b``) gives that preset's architecture, so ``ossforge plan``
    works before the weights are downloaded.
    """
    from ossforge.model.presets import PRESETS

    if model_cfg.preset:
        return dict(PRESETS[model_cfg.preset])
    folder = Path(model_cfg.path).expanduser()
    if not (folder / CONFIG).is_file() and folder.name in PRESETS:
        return dict(PRESETS[folder.name])
    return read_config(folder).to_dict()


def missing_weights_hint(folder) -> str:
    """What to do about a ``model.path`` that does not exist: where the weights go, how to fetch them."""
    from ossforge.model.presets import PRESETS

    folder = Path(folder)
    name = folder.name if folder.name in PRESETS and folder.name.startswith("gpt-oss") else "gpt-oss-20b"
    return (f"weights folder not found: {folder}; download them there with "
            f"`huggingface-cli download openai/{name} --local-dir {folder}` (or point --set model.path=DIR "
            f"at a copy, or train random weights with --set model.preset={name})")


def read_config(folder):
    """``GptOssConfig`` from ``folder/config.json`` (any ``quantization_config`` dropped: we dequantize)."""
    from transformers import GptOssConfig

    path = Path(folder) / CONFIG
    data = _read_json(path, what="a Hugging Face model folder")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    if data.get("model_type") != "gpt_oss":
        raise UserError(f"{path}: model_type: expected 'gpt_oss', got {data.get('model_type')!r}")
    data.pop("quantization_config", None)
    try:
        return GptOssConfig.from_dict(data)
    except Exception as exc:  # strict dataclass validation: wrong types, bad values
        raise UserError(f"{path}: invalid gpt-oss config: {exc}") from None


def weight_files(folder) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the shard index or the single file."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index}: weight_map: missing or empty")
        files = {}
        for name, file in weight_map.items():
            path = folder / str(file)
            if not path.is_file():
                raise UserError(f"{index}: weight_map.{name}: shard file not found: {path}")
            files[name] = path
        return files
    single = folder / SINGLE
    if single.is_file():
        with _open_safetensors(single) as f:
            return {name: single for name in f.keys()}
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise UserError(f"{folder}: only safetensors checkpoints are supported (found .bin/.pt files)")
    raise UserError(f"{folder}: no weights: expected {SINGLE} or {INDEX}")


def stored_dtype(folder):
    """The floating dtype the folder stores its non-expert weights in (bf16 for the published ones)."""
    import torch

    files = weight_files(folder)
    name = "model.embed_tokens.weight" if "model.embed_tokens.weight" in files else next(iter(files))
    with _open_safetensors(files[name]) as f:
        code = f.get_slice(name).get_dtype()
    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}.get(code, torch.float32)


def load_folder(folder, *, dtype=None, device="cpu", expert_range=None, expert_format: str = "bf16"):
    """Load a local HF gpt-oss folder; ``dtype`` None keeps fp32.

    ``expert_format="mxfp4"`` keeps the experts packed (MXFP4 folders: as stored; bf16 folders:
    quantised once, one tensor at a time).

    The model is built on the meta device and filled one tensor at a time on ``device``; experts are
    read as safetensors slices of ``expert_range`` only (all by default), MXFP4 ones through
    :func:`load_mxfp4_experts`. On ``device="meta"`` nothing is read (a dry run: names and shapes checked).
    """
    import torch

    from ossforge.model.local_experts import check_materialised, meta_model, rebuild_rotary

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"{folder}: model folder not found")
    dtype = dtype or torch.float32
    config = read_config(folder)
    model = meta_model(config)
    materialise_from_folder(model, folder, dtype=dtype, device=device, expert_range=expert_range,
                            packed=expert_format == "mxfp4")
    if expert_format == "mxfp4" and device != "meta":
        from ossforge.model.mxfp4_experts import quantize_experts_

        quantize_experts_(model)  # a bf16 folder's experts (already-packed ones are left as they are)
    rebuild_rotary(model, device)
    check_materialised(model, device)
    model.config.dtype = dtype
    model.name_or_path = str(folder)  # what peft records as base_model_name_or_path
    return model.eval()


def materialise_from_folder(model, folder, *, dtype, device, expert_range=None, packed: bool = False) -> None:
    """Fill a meta-device ``model`` from ``folder``'s safetensors, one tensor (or expert slice) at a time."""
    from ossforge.model.local_experts import set_expert_range

    folder = Path(folder)
    config = model.config
    files = weight_files(folder)
    total = config.num_local_experts
    start, stop = expert_range or (0, total)
    wanted = dict(model.state_dict(keep_vars=True))  # name -> meta tensor (shape); no op runs
    used = set()
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        if name in files:
            by_file.setdefault(files[name], []).append(name)
            used.add(name)
        elif name.endswith(EXPERT_WEIGHTS) and f"{name}_blocks" in files and f"{name}_scales" in files:
            by_file.setdefault(files[f"{name}_blocks"], []).append(name)
            used.update((f"{name}_blocks", f"{name}_scales"))
        elif name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied to the embedding below
        else:
            raise UserError(f"{folder}: missing tensor {name}")
    extra = sorted(set(files) - used)
    if extra:
        more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
        raise UserError(f"{folder}: unexpected tensors for a gpt-oss model: {', '.join(extra[:3])}{more}")
    for file, names in by_file.items():
        with _open_safetensors(file) as f:
            for name in names:
                module_name, _, attr = name.rpartition(".")
                module = model.get_submodule(module_name)
                expected = tuple(wanted[name].shape)
                local = _is_expert_tensor(name)
                rows = (start, stop) if local else None
                if name not in files:  # MXFP4 blocks + scales
                    blocks = _read_slice(f, file, f"{name}_blocks", rows, device)
                    with _open_other(f, file, files[f"{name}_scales"]) as g:
                        scales = _read_slice(g, files[f"{name}_scales"], f"{name}_scales", rows, device)
                    expected_local = (stop - start,) + expected[1:]
                    try:
                        load_mxfp4_experts(module, attr, (start, stop), blocks, scales, dtype=dtype, packed=packed)
                    except ValueError as exc:
                        raise UserError(f"{file}: {name}_blocks: {exc}") from None
                    got = tuple(getattr(module, attr).shape)
                    if got != expected_local:
                        raise UserError(f"{file}: {name}_blocks: experts {start}..{stop - 1} dequantise to shape "
                                        f"{got}, config expects {expected_local}")
                    continue
                full_shape = tuple(f.get_slice(name).get_shape())
                if full_shape != expected:
                    raise UserError(f"{file}: {name}: shape {full_shape}, config expects {expected}")
                _assign(model, name, _read_slice(f, file, name, rows, device, dtype))
    for _, experts in _experts_of(model):
        set_expert_range(experts, (start, stop), total)
    if "lm_head.weight" not in used and config.tie_word_embeddings:
        model.tie_weights()


def load_mxfp4_experts(experts, name: str, expert_range: tuple[int, int], blocks, scales, *, dtype,
                       packed: bool = False) -> None:
    """The one place MXFP4 expert weights enter a model: ``experts.<name>`` (``gate_up_proj`` or
    ``down_proj``) from the published ``blocks [n, rows, G, 16]`` / ``scales [n, rows, G]`` of the
    global experts ``expert_range`` (already sliced to them, on the target device).

    By default the experts are dequantised to ``dtype`` one expert at a time (exact: every FP4 value
    times a power of two is a bf16 number); ``packed`` keeps them MXFP4-resident instead
    (``model.expert_format: mxfp4``), as the kernels read them.
    """
    from ossforge.model.local_experts import assign
    from ossforge.model.mxfp4 import dequantize_mxfp4
    from ossforge.model.mxfp4_experts import install_mxfp4_expert_weight

    if packed:
        install_mxfp4_expert_weight(experts, name, blocks, scales, dtype)
    else:
        assign(experts, name, dequantize_mxfp4(blocks, scales, dtype))


def save_base(model, out_dir, *, max_shard_size: str | int = "5GB") -> Path:
    """Write a plain ``GptOssForCausalLM`` (before peft/fuse_moe) as an HF folder, atomically.

    The folder appears complete or not at all; an existing one is replaced. The model's
    ``name_or_path`` becomes the folder's absolute path, so a peft adapter created on it afterwards
    records it as ``base_model_name_or_path``.
    """
    from transformers import GptOssForCausalLM

    from ossforge.model.mxfp4_experts import is_mxfp4_resident

    if not isinstance(model, GptOssForCausalLM):
        raise TypeError(f"save_base needs a plain GptOssForCausalLM (save before wrapping), got {type(model).__name__}")
    with atomic_dir(out_dir) as tmp:
        if is_mxfp4_resident(model):  # packed experts are written as they are held: the published MXFP4 format
            write_mxfp4_folder(model, tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
    model.name_or_path = str(Path(out_dir).resolve())
    return Path(out_dir)


def save_mxfp4_checkpoint(model, out_dir, **kwargs) -> Path:
    """Write ``model`` as an HF folder whose experts are MXFP4 (published format), atomically.

    Keyword arguments as :func:`write_mxfp4_folder`.
    """
    with atomic_dir(out_dir) as tmp:
        write_mxfp4_folder(model, tmp, **kwargs)
    return Path(out_dir)


def write_mxfp4_folder(model, folder, *, dtype=None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                       roundtrip_in_place: bool = False) -> None:
    """Write ``config.json`` + safetensors with experts as MXFP4 ``*_blocks``/``*_scales`` into ``folder``.

    Other tensors are stored in ``dtype`` (default: as they are). ``roundtrip_in_place`` replaces the
    model's expert weights by their dequantized MXFP4 values, so the caller can measure the error the
    quantization adds without a second copy of the model.
    """
    import torch

    from ossforge.model.mxfp4 import GROUP, dequantize_mxfp4, quantize_mxfp4
    from ossforge.model.mxfp4_experts import MXFP4Tensor

    config = model.config
    for dim in (config.hidden_size, config.intermediate_size):
        if dim % GROUP:
            raise UserError(f"--mxfp4: hidden_size and intermediate_size must be multiples of {GROUP}, got {dim}")

    # Quantizing is elementwise work: a GPU, when there is one, does it ~100x faster than a CPU.
    work = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in model.state_dict().items():
            if isinstance(param, MXFP4Tensor):  # already packed: the bytes as held
                yield f"{name}_blocks", param.blocks
                yield f"{name}_scales", param.scales
            elif name.endswith(EXPERT_WEIGHTS):
                blocks, scales = quantize_mxfp4(param.detach().to(work))
                blocks, scales = blocks.to(param.device), scales.to(param.device)
                yield f"{name}_blocks", blocks
                yield f"{name}_scales", scales
                if roundtrip_in_place:
                    with torch.no_grad():
                        param.copy_(dequantize_mxfp4(blocks, scales, param.dtype))
            else:
                yield name, param.detach().to(dtype) if dtype is not None else param.detach()

    config_dict = config.to_dict()
    config_dict["architectures"] = ["GptOssForCausalLM"]  # serving stacks pick the model class by this
    config_dict["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": MXFP4_NOT_CONVERTED}
    if dtype is not None:
        config_dict["dtype"] = str(dtype).removeprefix("torch.")
    folder = Path(folder)
    write_safetensors(tensors(), folder, max_shard_bytes=max_shard_bytes)
    (folder / CONFIG).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")


def write_safetensors(tensors, folder, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write ``(name, tensor)`` pairs as ``model.safetensors`` or HF-style shards plus index."""
    from safetensors.torch import save_file

    folder = Path(folder)
    shards: list[dict] = []
    current: dict = {}
    size = total = 0

    def flush():
        nonlocal current, size
        if current:
            path = folder / f".shard-{len(shards):05d}.safetensors"
            save_file(current, str(path), metadata={"format": "pt"})
            shards.append({"path": path, "names": list(current)})
        current, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = tensor.contiguous()
        size += nbytes
        total += nbytes
    flush()
    if len(shards) == 1:
        shards[0]["path"].rename(folder / SINGLE)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        shard["path"].rename(folder / final)
        weight_map.update({name: final for name in shard["names"]})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


# -- helpers ---------------------------------------------------------------------------------

def _read_json(path: Path, what: str = ""):
    try:
        text = path.read_text()
    except FileNotFoundError:
        hint = f" (expected {what})" if what else ""
        raise UserError(f"{path}: file not found{hint}") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None


@contextmanager
def _open_safetensors(path: Path):
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # SafetensorError, OSError: truncated or not safetensors at all
        raise UserError(f"{path}: not a readable safetensors file: {exc}") from None
    with handle as f:
        yield f


def _is_expert_tensor(name: str) -> bool:
    return ".mlp.experts." in name


def _experts_of(model):
    from ossforge.model.local_experts import expert_modules

    return expert_modules(model)


@contextmanager
def _open_other(f, file: Path, other: Path):
    """``f`` again when ``other`` is the same file, else ``other`` opened."""
    if other == file:
        yield f
        return
    with _open_safetensors(other) as g:
        yield g


def _read_slice(f, file: Path, key: str, rows, device, dtype=None):
    """Tensor ``key``, or only its rows ``[start, stop)`` (nothing else is read), as a tensor of its own on
    ``device`` (in ``dtype`` if given).

    On the meta device nothing is read at all: a tensor of the right shape and dtype stands in.
    """
    import torch

    try:
        view = f.get_slice(key)  # safetensors validated the header: shape and dtype
        full_shape = list(view.get_shape())
        stored = _safetensors_dtypes()[view.get_dtype()]
    except Exception as exc:
        raise UserError(f"{file}: {key}: cannot read tensor: {exc}") from None
    shape = full_shape if rows is None else [rows[1] - rows[0], *full_shape[1:]]
    if torch.device(device).type == "meta":
        return torch.empty(shape, dtype=dtype or stored, device="meta")
    begin, end = _data_offsets(file, key)
    if rows is not None:
        row_bytes = (end - begin) // max(full_shape[0], 1)
        begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
    tensor = _read_bytes(file, key, begin, end).view(stored).reshape(shape)
    return tensor.to(device=device, dtype=dtype or stored)  # on the CPU in its dtype: the buffer itself


def _data_offsets(file: Path, key: str) -> tuple[int, int]:
    """Absolute byte range of tensor ``key`` in a safetensors file."""
    stat = Path(file).stat()
    length, header = _header(str(file), stat.st_mtime_ns, stat.st_size)
    begin, end = header[key]["data_offsets"]
    return 8 + length + begin, 8 + length + end


@functools.lru_cache(maxsize=8)
def _header(path: str, mtime_ns: int, size: int) -> tuple[int, dict]:
    """(header length, header) of a safetensors file: u64 little-endian length, then JSON; cached per
    file version (a shard holds hundreds of tensors)."""
    with open(path, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        return length, json.loads(fh.read(length))


def _read_bytes(file: Path, key: str, begin: int, end: int):
    """Bytes ``[begin, end)`` of ``file`` read into a new uint8 tensor.

    Read, not memory-mapped (safetensors' ``safe_open`` maps the file): a mapped tensor's pages count
    towards the process's RSS as far as the machine's page cache has them, so the same load peaked
    0.4 GiB apart on two machines, and parameters kept as views of the map would stay file-backed.
    safetensors has no unmapped reader for one tensor or a row range of it, hence this.
    """
    import torch

    out = torch.empty(end - begin, dtype=torch.uint8)
    buffer, done = memoryview(out.numpy()), 0
    with open(file, "rb") as fh:
        fh.seek(begin)
        while done < len(buffer):  # one read() returns at most ~2 GiB on Linux
            n = fh.readinto(buffer[done:])
            if not n:
                raise UserError(f"{file}: {key}: file ends inside the tensor (truncated?)")
            done += n
    return out


def _safetensors_dtypes():
    import torch

    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
            "U8": torch.uint8, "I8": torch.int8, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


def _assign(model, name: str, tensor) -> None:
    """Replace the meta parameter/buffer ``name`` by ``tensor`` (keeps requires_grad)."""
    import torch

    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = tensor
