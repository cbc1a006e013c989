"""Run configuration: YAML -> validated, typed ``Config``.

- ``extends: other.yaml`` inherits another file (path relative to the including file, then to
  the working directory); mappings merge key by key, the including file wins.
- ``model.path`` (in an including file or as ``--set model.path=DIR``) replaces an inherited or
  configured ``model.preset``, and ``model.preset`` a path.
- ``--set a.b=c`` overrides after merging; values are parsed as YAML scalars (``3`` -> int,
  ``true`` -> bool, ``[a,b]`` -> list) and checked by the schema like everything else.
- Unknown keys are errors, so a misspelled key never passes silently.
- Relative data/model/output paths (and ``lora.init_adapter``) resolve against the top config file's
  folder first, then the working directory (so ``configs/x.yaml`` can say ``../data/...`` and runs
  from anywhere).

Every problem raises :class:`UserError` as ``<file>: <field path>: <reason>`` before anything
is built or written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ossforge.errors import UserError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    preset: Optional[str] = None
    path: Optional[str] = None
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    init_seed: int = 0  # seed for random-initialised presets
    # mxfp4: experts stay packed (4.25 bits/param); auto: mxfp4 for MXFP4 folders trained on CUDA, else bf16
    expert_format: Literal["auto", "bf16", "mxfp4"] = "auto"

    @model_validator(mode="after")
    def _one_source(self):
        if not self.preset and not self.path:
            raise ValueError("set model.preset or model.path")
        if self.preset and self.path:
            raise ValueError("set only one of model.preset and model.path")
        if self.preset:
            from ossforge.model.presets import PRESETS, preset_names

            if self.preset not in PRESETS:
                raise ValueError(f"unknown preset {self.preset!r} (choose from {', '.join(preset_names())})")
        return self


class DataConfig(_Section):
    train: str
    eval: Optional[str] = None
    drop_analysis: bool = False  # harmony's auto_drop_analysis; False keeps reasoning of tool turns
    packing: bool = False  # pack several short conversations into one seq_len row


class LoraConfig(_Section):
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    expert_targets: list[str] = ["gate_up_proj", "down_proj"]
    expert_layers: Optional[list[int]] = None  # None: all layers
    init_adapter: Optional[str] = None  # peft adapter folder whose LoRA weights training starts from

    @field_validator("init_adapter")
    @classmethod
    def _adapter_folder(cls, v):
        if v is not None and not v.strip():
            raise ValueError("empty path (leave the key out, or null, for no warm start)")
        return v

    @field_validator("expert_targets")
    @classmethod
    def _known_expert_params(cls, v):
        bad = [t for t in v if t not in ("gate_up_proj", "down_proj")]
        if bad:
            raise ValueError(f"unknown expert parameter {bad[0]!r} (choose from gate_up_proj, down_proj)")
        return v


class TrainingConfig(_Section):
    max_steps: int = Field(100, gt=0)
    lr: float = Field(2e-4, gt=0)
    micro_batch_size: int = Field(1, gt=0)
    grad_accum: int = Field(1, gt=0)
    seq_len: int = Field(2048, gt=8)
    seed: int = 0
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine/linear decay to lr * min_lr_ratio
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    gradient_checkpointing: bool = False
    fused_moe: bool = True  # run MoE layers on ossforge.model.fuse_moe kernels (same results, faster)
    router_aux_loss_coef: float = Field(0.0, ge=0)
    # auto: flex attention with sinks on CUDA, eager on CPU (ossforge.model.attention)
    attention: Literal["auto", "eager", "flex"] = "auto"
    # auto: Liger's fused linear cross-entropy on CUDA, chunked torch elsewhere (ossforge.finetune.loss)
    loss: Literal["auto", "liger", "chunked", "full"] = "auto"
    log_every: int = Field(1, gt=0)
    eval_every: int = Field(0, ge=0)  # 0: only at the end
    save_every: int = Field(0, ge=0)  # 0: only at the end


class ParallelConfig(_Section):
    expert_parallel_size: int = Field(1, gt=0)


class Config(_Section):
    extends: Optional[str] = None  # consumed while loading; kept for the record
    model: ModelConfig
    data: DataConfig
    lora: LoraConfig = LoraConfig()
    training: TrainingConfig = TrainingConfig()
    parallel: ParallelConfig = ParallelConfig()
    deepspeed: dict[str, Any] = {}
    output_dir: str = "runs/default"

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.model.preset:
            from ossforge.model.presets import PRESETS

            arch = PRESETS[self.model.preset]
            experts, layers = arch["num_local_experts"], arch["num_hidden_layers"]
            if experts % self.parallel.expert_parallel_size:
                raise _FieldError(
                    "parallel.expert_parallel_size",
                    f"{self.parallel.expert_parallel_size} does not divide the model's {experts} experts",
                )
            for layer in self.lora.expert_layers or []:
                if not 0 <= layer < layers:
                    raise _FieldError("lora.expert_layers", f"layer {layer} out of range 0..{layers - 1}")
        return self

    def to_yaml(self) -> str:
        """The resolved config, as written to ``<output_dir>/config.yaml``."""
        return yaml.safe_dump(self.model_dump(mode="json", exclude={"extends"}), sort_keys=False)


class _FieldError(ValueError):
    """A cross-field check that names its own field path."""

    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


# ----------------------------------------------------------------------------- loading


def _read_yaml(path: Path, included_from: Optional[Path] = None) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        who = f"{included_from}: extends" if included_from else str(path)
        raise UserError(f"{who}: file not found: {path}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping of config sections")
    return data


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _load_with_extends(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    data = _read_yaml(path, chain[-1] if chain else None)
    parent = data.get("extends")
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise UserError(f"{path}: extends: must be a file path")
    candidates = [path.parent / parent, Path(parent)]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise UserError(f"{path}: extends: file not found: {parent}")
    if found.resolve() in {p.resolve() for p in chain + (path,)}:
        raise UserError(f"{path}: extends: circular include of {found}")
    base = _load_with_extends(found, chain + (path,))
    return _deep_merge(_drop_replaced_model_source(base, data.get("model")), data)


def _drop_replaced_model_source(data: dict, model: Any) -> dict:
    """``model.path`` set over an inherited ``model.preset`` replaces it, and vice versa (a single
    file or ``--set`` list that names both is still an error)."""
    if not isinstance(model, dict) or not isinstance(data.get("model"), dict):
        return data
    drop = {other for key, other in (("path", "preset"), ("preset", "path")) if model.get(key) is not None}
    return {**data, "model": {k: v for k, v in data["model"].items() if k not in drop}}


def _apply_override(data: dict, assignment: str, source: str) -> None:
    if "=" not in assignment:
        raise UserError(f"{source}: --set {assignment}: expected key.path=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise UserError(f"{source}: --set {assignment}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"{source}: --set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value
    if parts[0] == "model" and len(parts) == 2 and parts[1] in ("path", "preset") and value is not None:
        node.pop("preset" if parts[1] == "path" else "path", None)  # --set model.path replaces a preset, and vice versa


def _resolve_path(value: Optional[str], base: Path, missing_beside: bool = False) -> Optional[str]:
    """Relative paths: config folder first, then the working directory; a path found in neither stays
    as written, or (``missing_beside``: a weights folder yet to be downloaded) becomes config-relative."""
    if value is None or Path(value).is_absolute():
        return value
    beside = base / value
    if beside.exists() or not Path(value).exists():
        return str(beside) if beside.exists() or missing_beside else value
    return value


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), check_files: bool = True) -> Config:
    """Load, merge, override and validate a config; raises UserError on any problem."""
    path = Path(path)
    data = _load_with_extends(path)
    for assignment in overrides:
        _apply_override(data, assignment, str(path))
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "config"
        message = err["msg"]
        inner = err.get("ctx", {}).get("error")
        if isinstance(inner, _FieldError):
            field, message = inner.field, inner.reason
        elif err["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see README 'Config keys')"
        elif message.startswith("Value error, "):
            message = message[len("Value error, "):]
        raise UserError(f"{path}: {field}: {message}") from None

    base = path.parent
    config.data.train = _resolve_path(config.data.train, base)
    config.data.eval = _resolve_path(config.data.eval, base)
    config.model.path = _resolve_path(config.model.path, base, missing_beside=True)
    config.lora.init_adapter = _resolve_path(config.lora.init_adapter, base)
    if check_files:
        for field, value in (("data.train", config.data.train), ("data.eval", config.data.eval)):
            if value is not None and not Path(value).exists():
                raise UserError(f"{path}: {field}: file not found: {value}")
        if config.model.path is not None and not Path(config.model.path).is_dir():
            from ossforge.model.checkpoint import missing_weights_hint

            raise UserError(f"{path}: model.path: {missing_weights_hint(config.model.path)}")
        if config.lora.init_adapter is not None:
            _check_init_adapter(config.lora, path)
    return config


def _check_init_adapter(lora, path: Path) -> None:
    """``lora.init_adapter`` is a peft adapter folder that fits the ``lora:`` section."""
    from ossforge.finetune.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_init_adapter

    folder = Path(lora.init_adapter)
    if not folder.is_dir():
        reason = "expected the adapter folder, got a file" if folder.exists() else "adapter folder not found"
        raise UserError(f"{path}: lora.init_adapter: {reason}: {folder}")
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{path}: lora.init_adapter: {folder} is not a peft adapter folder (no {' or '.join(missing)})")
    check_init_adapter(lora, path)
