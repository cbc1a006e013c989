"""The DeepSpeed internals ossforge relies on (finetune/expert_parallel.py, trainer.py, run_dir.py,
grad_clip.py, frozen_broadcast.py), one test each, in the pinned range of pyproject.toml. A failure names the API that
changed: re-check the code using it before widening the pin. Also: strict resume (a checkpoint without
the expert LoRA fails to load with a clear error). One rank, gloo, in this process."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


def _api(owner, name: str, where: str):
    """``owner.name``, or a failure naming the private API that is gone."""
    value = getattr(owner, name, None)
    assert value is not None, f"DeepSpeed private API changed: {where}.{name} no longer exists"
    return value


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_deepspeed_version_is_in_the_pinned_range():
    import deepspeed
    from packaging.specifiers import SpecifierSet

    text = (REPO / "pyproject.toml").read_text()
    spec = SpecifierSet(re.search(r'"deepspeed([^"]+)"', text).group(1))
    assert deepspeed.__version__.split("+")[0] in spec, f"deepspeed {deepspeed.__version__} outside {spec}"
    assert "0.19.1" not in spec and "0.19.2" in spec  # 0.17.0-0.19.1 drop "expert" keys from model states


def test_groups_create_expert_and_data_parallel(one_rank):
    from deepspeed.utils import groups

    create = _api(groups, "_create_expert_and_data_parallel", "deepspeed.utils.groups")
    assert _params(create)[0] == "expert_parallel_size_", \
        "DeepSpeed private API changed: groups._create_expert_and_data_parallel(expert_parallel_size_, ...)"
    get_dict = _api(groups, "_get_expert_parallel_group_dict", "deepspeed.utils.groups")
    if "ep_size_1" not in get_dict():
        create(1)
    assert "ep_size_1" in get_dict(), \
        "DeepSpeed private API changed: groups._create_expert_and_data_parallel no longer registers 'ep_size_N'"


def test_groups_get_expert_parallel_group_dict(one_rank):
    from deepspeed.utils import groups

    test_groups_create_expert_and_data_parallel(one_rank)
    groups_dict = _api(groups, "_get_expert_parallel_group_dict", "deepspeed.utils.groups")()
    assert isinstance(groups_dict, dict), "DeepSpeed private API changed: groups._get_expert_parallel_group_dict()"


def test_groups_get_expert_parallel_group_and_rank(one_rank):
    import torch.distributed as dist
    from deepspeed.utils import groups

    test_groups_create_expert_and_data_parallel(one_rank)
    group = _api(groups, "_get_expert_parallel_group", "deepspeed.utils.groups")("ep_size_1")
    assert dist.get_world_size(group=group) == 1, "DeepSpeed private API changed: groups._get_expert_parallel_group"
    assert _api(groups, "_get_expert_parallel_rank", "deepspeed.utils.groups")("ep_size_1") == 0, \
        "DeepSpeed private API changed: groups._get_expert_parallel_rank"
    edp = _api(groups, "_get_expert_data_parallel_group", "deepspeed.utils.groups")("ep_size_1")
    assert dist.get_world_size(group=edp) == 1  # what DeepSpeed reduces our expert gradients over


class _WithMarker(nn.Module):
    """A dense weight, an "expert" weight (named as ours are) and the EP marker."""

    def __init__(self, ep_size: int = 1):
        super().__init__()
        from ossforge.finetune.expert_parallel import _marker_class

        self.dense = nn.Linear(4, 4)
        self.experts = nn.Linear(4, 4)
        self.ossforge_expert_parallel = _marker_class()(ep_size, 8)

    def forward(self, x):
        return self.experts(self.dense(x))


def _engine(module, **ds):
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "zero_optimization": {"stage": 0}, **ds}
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    return engine


def test_moe_marker_subclass_skipping_moe_init_is_seen_by_the_engine(one_rank):
    """``_MoEGroupsMarker`` subclasses ``deepspeed.moe.layer.MoE`` without running ``MoE.__init__``: the
    engine must still find it, read its attributes and call ``set_deepspeed_parallelism``."""
    from deepspeed.moe.layer import MoE

    from ossforge.finetune.expert_parallel import _marker_class

    marker = _marker_class()(1, 8)
    assert isinstance(marker, MoE), "DeepSpeed private API changed: deepspeed.moe.layer.MoE"
    for name in ("set_deepspeed_parallelism",):
        assert hasattr(MoE, name), f"DeepSpeed private API changed: deepspeed.moe.layer.MoE.{name}"
    from ossforge.finetune.expert_parallel import _MoEGroupsMarker

    calls = []
    cls = _MoEGroupsMarker
    original = cls.set_deepspeed_parallelism
    cls.set_deepspeed_parallelism = lambda self, *a, **k: (calls.append(1), original(self, *a, **k))[1]
    try:
        engine = _engine(_WithMarker())
    finally:
        cls.set_deepspeed_parallelism = original
    assert engine.has_moe_layers is True, "DeepSpeed private API changed: engine.has_moe_layers from MoE modules"
    assert calls, "DeepSpeed private API changed: engine no longer calls MoE.set_deepspeed_parallelism"


def test_has_moe_layers_flip_switches_the_checkpoint_layout(one_rank, tmp_path):
    """``ep_independent`` flips ``engine.has_moe_layers`` off to write one EP=1-shaped model-states file."""
    engine = _engine(_WithMarker())
    assert hasattr(engine, "has_moe_layers"), "DeepSpeed private API changed: DeepSpeedEngine.has_moe_layers"
    engine.has_moe_layers = False
    engine.save_checkpoint(str(tmp_path / "flat"), tag="t")
    engine.has_moe_layers = True
    # (A MoE-layout save clears engine.save_non_zero_checkpoint for good, so it comes last here; ossforge
    # never writes one on the ZeRO-0 paths, the only ones it allows with EP.)
    engine.save_checkpoint(str(tmp_path / "moe"), tag="t")
    moe = sorted(p.name for p in (tmp_path / "moe" / "t").iterdir())
    flat = sorted(p.name for p in (tmp_path / "flat" / "t").iterdir())
    assert any(n.startswith("expp_rank_") for n in moe), \
        f"DeepSpeed private API changed: has_moe_layers=True save layout {moe}"
    assert flat == ["mp_rank_00_model_states.pt"], \
        f"DeepSpeed private API changed: has_moe_layers=False save layout {flat}"


def test_non_moe_state_dict_keeps_keys_named_expert(one_rank):
    """The 0.17.0-0.19.1 bug: ``_get_non_moe_state_dict`` dropped every key containing "expert"."""
    engine = _engine(_WithMarker())
    strip = _api(engine, "_get_non_moe_state_dict", "DeepSpeedEngine")
    kept = strip({"experts.weight": torch.zeros(1), "dense.weight": torch.zeros(1)})
    assert "experts.weight" in kept, \
        "DeepSpeedEngine._get_non_moe_state_dict drops expert LoRA keys (DeepSpeed 0.17.0-0.19.1 behaviour)"


def test_bf16_zero0_wrapper_exposes_fp32_masters(one_rank):
    """bf16 ZeRO-0 resolves to ``FP16_UnfusedOptimizer`` whose ``fp16_groups``/``fp32_groups``/``optimizer``
    ``ep_independent`` gathers; its ``clip_grad`` must be off (we clip)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    engine = _engine(_WithMarker().to(torch.bfloat16), bf16={"enabled": True}, gradient_clipping=0.0)
    opt = engine.optimizer
    assert isinstance(opt, FP16_UnfusedOptimizer), \
        f"DeepSpeed changed: bf16 ZeRO-0 wrapper is {type(opt).__name__}, not FP16_UnfusedOptimizer"
    for name in ("fp16_groups", "fp32_groups", "optimizer", "clip_grad"):
        assert hasattr(opt, name), f"DeepSpeed private API changed: FP16_UnfusedOptimizer.{name}"
    assert opt.clip_grad == 0.0
    assert [p.dtype for g in opt.fp32_groups for p in g] == [torch.float32] * 4
    assert "fp32_groups" in opt.state_dict(), "DeepSpeed changed: FP16_UnfusedOptimizer.state_dict()['fp32_groups']"


class BroadcastLog:
    """Records the tensors ``deepspeed.comm.broadcast`` sends while active (the engine calls it as ``dist.broadcast``)."""

    def __enter__(self):
        import deepspeed.comm

        self.sent, self._original = [], deepspeed.comm.broadcast

        def logged(tensor, *args, **kwargs):
            self.sent.append(tensor)
            return self._original(tensor, *args, **kwargs)

        deepspeed.comm.broadcast = logged
        return self

    def __exit__(self, *exc):
        import deepspeed.comm

        deepspeed.comm.broadcast = self._original

    def pointers(self) -> set[int]:
        return {t.data_ptr() for t in self.sent}


def test_broadcast_model_skips_parameters_marked_ds_optim_param(one_rank):
    """``finetune/frozen_broadcast.py`` keeps the frozen base out of the engine's start-up broadcast by marking
    it ``ds_optim_param`` during ``deepspeed.initialize``: ``DeepSpeedEngine._broadcast_model`` must skip
    parameters carrying it, and still broadcast the others."""
    import deepspeed

    _api(deepspeed.DeepSpeedEngine, "_broadcast_model", "DeepSpeedEngine")
    module = _WithMarker()
    module.dense.weight.ds_optim_param = True
    with BroadcastLog() as log:
        _engine(module)
    sent = log.pointers()
    assert module.experts.weight.data_ptr() in sent and module.dense.bias.data_ptr() in sent, \
        "DeepSpeed changed: DeepSpeedEngine._broadcast_model no longer broadcasts parameters through deepspeed.comm.broadcast"
    assert module.dense.weight.data_ptr() not in sent, \
        "DeepSpeed private API changed: DeepSpeedEngine._broadcast_model no longer skips parameters with ds_optim_param"
    assert len(log.sent) == 3  # the three unmarked parameters, once each


def test_engine_load_checkpoint_takes_custom_load_fn_and_reports_grad_norm(one_rank):
    import deepspeed

    params = _params(deepspeed.DeepSpeedEngine.load_checkpoint)
    assert "custom_load_fn" in params, "DeepSpeed API changed: DeepSpeedEngine.load_checkpoint(custom_load_fn=)"
    assert hasattr(deepspeed.DeepSpeedEngine, "get_global_grad_norm"), \
        "DeepSpeed API changed: DeepSpeedEngine.get_global_grad_norm"


# ----------------------------------------------------------------------------- strict resume


def _tiny_engine():
    from peft import LoraConfig, get_peft_model

    from ossforge.finetune.config import TrainingConfig
    from ossforge.finetune.trainer import deepspeed_config, initialize_engine
    from ossforge.model.presets import build_random

    model = build_random("tiny", seed=0)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = get_peft_model(model, lora)
    config = SimpleNamespace(training=TrainingConfig(max_steps=2), deepspeed={})
    return initialize_engine(model, config, deepspeed_config(config, torch.float32, None))


def test_resume_is_strict_a_checkpoint_without_expert_lora_is_an_error(one_rank, tmp_path):
    from ossforge.errors import UserError
    from ossforge.finetune.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    engine = _tiny_engine()
    run.save_checkpoint(engine, 1, {"step": 1})
    assert run.load_checkpoint(engine, "step-1")["step"] == 1  # a complete checkpoint loads

    states = run.checkpoints_dir / "step-1" / "mp_rank_00_model_states.pt"
    checkpoint = torch.load(states, weights_only=True)
    experts = [k for k in checkpoint["module"] if ".experts." in k]
    assert experts
    for key in experts:  # what DeepSpeed 0.17.0-0.19.1 wrote at EP>1
        del checkpoint["module"][key]
    torch.save(checkpoint, states)
    with pytest.raises(UserError, match=rf"checkpoint lacks {len(experts)} trainable tensors \({len(experts)} of them "
                                        r"expert LoRA\), first .*experts.*; it cannot resume this run"):
        run.load_checkpoint(_tiny_engine(), "step-1")
