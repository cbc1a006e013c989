"""The run directory (``output_dir``, DESIGN §3) and its crash-safe writes.

::

    config.yaml           resolved config of the run
    metrics.jsonl         one JSON object per logged step (step, loss, lr, tokens_per_s, ...)
    adapter/              peft adapter: adapter_config.json + adapter_model.safetensors
    base/                 the random-initialised base model (preset runs under 20 GiB), HF folder
    base_record.json      larger presets: what rebuilds the base (preset, init_seed, dtype) instead
    checkpoints/          DeepSpeed checkpoints (step-N/ and ``latest``) for --resume
    tensorboard/          TensorBoard event files
    loss.png              loss curves (train, eval) and learning rate, drawn at the end
    expert_load.png       expert load per layer over the run, drawn at the end
    report.html           run report with the figures (and eval.json's scores when present)

Every file is written to a temporary name and renamed into place, so a killed run leaves the
previous version of each file whole. DeepSpeed writes ``checkpoints/latest`` only after the new
checkpoint is complete, and older checkpoints are pruned only after that.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from ossforge import atomic
from ossforge.errors import UserError

KEEP_CHECKPOINTS = 2


def unwrap(model_or_engine):
    """The peft model inside a DeepSpeed engine (or the model itself)."""
    return getattr(model_or_engine, "module", model_or_engine)


def save_adapter(model_or_engine, out_dir: str | Path) -> Path:
    """Save the LoRA adapter in peft format, replacing ``out_dir``'s files atomically one by one.

    The adapter is first written completely to a temp folder beside ``out_dir``; only then is each
    file renamed into ``out_dir``, the small config before the weights. A crash at any point leaves
    every file of ``out_dir`` either the old or the new complete version (the config is the same
    within a run, the weights one file).
    Expert parallelism gathers the sharded expert LoRA here before writing.
    """
    with atomic.directory(Path(out_dir), file_by_file=True) as staging:
        # save_embedding_layers=False: with lm_head among the LoRA targets peft would otherwise copy the
        # frozen 201k-row head into every adapter; the base already holds it.
        unwrap(model_or_engine).save_pretrained(str(staging), safe_serialization=True, save_embedding_layers=False)
    return Path(out_dir)


def load_trainable(state: dict, model, where) -> None:
    """``model.load_state_dict(state)`` for a state holding exactly ``model``'s trainable tensors."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in trainable if n not in state]
    if missing:
        experts = sum(".experts." in n for n in missing)
        raise UserError(f"{where}: checkpoint lacks {len(missing)} trainable tensors ({experts} of them expert "
                        f"LoRA), first {missing[0]}; it cannot resume this run")
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise UserError(f"{where}: checkpoint holds tensors this model does not have, first "
                        f"{result.unexpected_keys[0]}; it cannot resume this run")


class RunDir:
    """Paths and writes of one run's output folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_file = self.path / "config.yaml"
        self.metrics_file = self.path / "metrics.jsonl"
        self.adapter_dir = self.path / "adapter"
        self.base_dir = self.path / "base"
        self.base_record = self.path / "base_record.json"
        self.shared_token = self.path / ".shared-fs-token"
        self.checkpoints_dir = self.path / "checkpoints"
        self.tensorboard_dir = self.path / "tensorboard"
        self.loss_png = self.path / "loss.png"
        self.expert_load_png = self.path / "expert_load.png"
        self.report_html = self.path / "report.html"

    # -- lifecycle -------------------------------------------------------------------------

    def check_resumable(self) -> str:
        """Tag of the newest complete checkpoint; UserError when there is none."""
        tag = self.latest_checkpoint()
        if tag is None:
            raise UserError(f"{self.path}: --resume: no checkpoint to resume from "
                            f"(expected {self.checkpoints_dir}/latest); start without --resume")
        return tag

    def start(self, config_yaml: str, resume: bool) -> None:
        """Create the folder and write ``config.yaml``; a fresh run clears an old run's history."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not resume:
            for stale in (self.checkpoints_dir, self.tensorboard_dir):
                shutil.rmtree(stale, ignore_errors=True)
            for stale in (self.metrics_file, self.loss_png, self.expert_load_png, self.report_html):
                stale.unlink(missing_ok=True)
        atomic.write_text(self.config_file, config_yaml)

    def check_shared(self) -> None:
        """Collective over all ranks: every rank must see the run folder rank 0 writes to.

        Rank 0 writes a fresh token file, every rank reads it after a barrier, and all ranks agree on
        the outcome, so a node without the shared filesystem fails on every rank at once (a UserError,
        exit 2) instead of later, in a collective that never completes.
        """
        import torch
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        rank = dist.get_rank()
        token = [uuid.uuid4().hex if rank == 0 else None]
        if rank == 0:
            atomic.write_text(self.shared_token, token[0])
        dist.broadcast_object_list(token, src=0)
        dist.barrier()
        try:
            seen = self.shared_token.read_text() == token[0]
        except OSError:
            seen = False
        blind = torch.tensor([0 if seen else 1], dtype=torch.int64)
        flags = [torch.zeros_like(blind) for _ in range(dist.get_world_size())]
        dist.all_gather(flags, blind)
        missing = [r for r, f in enumerate(flags) if int(f)]
        if missing:
            host = os.uname().nodename
            raise UserError(f"{self.path}: output_dir: ranks {missing} cannot see the file rank 0 wrote there "
                            f"(this is rank {rank} on {host}); the run folder must be on a filesystem all nodes share")

    def write_base_record(self, model_cfg, dtype) -> None:
        """Record how to rebuild a random-init base too large to write (see ``read_base_record``)."""
        record = {"preset": model_cfg.preset, "init_seed": model_cfg.init_seed,
                  "dtype": str(dtype).removeprefix("torch.")}
        shutil.rmtree(self.base_dir, ignore_errors=True)  # an earlier run's base/ would be taken for this one's
        atomic.write_text(self.base_record, json.dumps(record, indent=2) + "\n")

    # -- checkpoints -----------------------------------------------------------------------

    def latest_checkpoint(self) -> str | None:
        latest = self.checkpoints_dir / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        return tag if (self.checkpoints_dir / tag).is_dir() else None

    def save_checkpoint(self, engine, step: int, client_state: dict) -> str:
        """DeepSpeed checkpoint of the trainable state (LoRA, optimizer, LR schedule) + client state."""
        tag = f"step-{step}"
        if self.latest_checkpoint() == tag:
            return tag  # already saved at this step (e.g. Ctrl-C right after a periodic save)
        engine.save_checkpoint(str(self.checkpoints_dir), tag=tag, client_state=client_state,
                               exclude_frozen_parameters=True)
        if getattr(engine, "global_rank", 0) == 0:  # one rank prunes the shared folder
            self._prune(keep=tag)
        return tag

    def load_checkpoint(self, engine, tag: str) -> dict:
        """Load ``tag`` into ``engine``; every trainable tensor must be in it (UserError naming the first
        missing one): frozen weights are not saved, so DeepSpeed's non-strict load would silently keep
        freshly initialised LoRA for any key a checkpoint lacks."""
        where = self.checkpoints_dir / tag
        path, client_state = engine.load_checkpoint(str(self.checkpoints_dir), tag=tag,
                                                    custom_load_fn=lambda src, dst: load_trainable(src, dst, where))
        if path is None:
            raise UserError(f"{where}: cannot load checkpoint")
        return client_state or {}

    def _prune(self, keep: str) -> None:
        tags = sorted((p for p in self.checkpoints_dir.glob("step-*") if p.is_dir()),
                      key=lambda p: int(p.name.split("-")[1]))
        for old in tags[:-KEEP_CHECKPOINTS]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    # -- metrics ---------------------------------------------------------------------------

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict]:
        if not self.metrics_file.is_file():
            return []
        out = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        return out

    def truncate_metrics(self, last_step: int) -> None:
        """On resume: drop records logged after the checkpoint, so the file has each step once."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= last_step]
        atomic.write_text(self.metrics_file, "".join(json.dumps(r) + "\n" for r in kept))

    def plot_loss(self) -> Path | None:
        """``loss.png``: training (and eval) loss and the learning rate against step."""
        from ossforge.finetune.report import plot_loss

        return plot_loss(self.read_metrics(), self.loss_png, title=self.path.name)


def read_base_record(run_path: str | Path):
    """``(ModelConfig, torch dtype)`` of a run's ``base_record.json``, or None when it has none.

    ``ossforge merge`` / ``eval`` rebuild such a base with ``load_model``; it equals the one trained on.
    """
    import torch

    from ossforge.finetune.config import ModelConfig

    path = Path(run_path) / "base_record.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[record["dtype"]]
        return ModelConfig(preset=record["preset"], init_seed=record["init_seed"]), dtype
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a base record: {exc}") from None


def ensure_recorded_base(run_path: str | Path) -> Path | None:
    """``<run>/base`` when it exists; else, when the run recorded its base instead (``base_record.json``),
    that base rebuilt there, streaming (one module and one shard in memory); else None."""
    folder = Path(run_path) / "base"
    if (folder / "config.json").is_file():
        return folder
    record = read_base_record(run_path)
    if record is None:
        return None
    from ossforge.model.presets import write_random_folder

    model_cfg, dtype = record
    print(f"rebuilding the run's random-init base ({model_cfg.preset}, init_seed {model_cfg.init_seed}) "
          f"into {folder}", flush=True)
    write_random_folder(model_cfg.preset, model_cfg.init_seed, dtype, folder)
    return folder
