"""Expert parallelism for gpt-oss under ``deepspeed.initialize``, applied to a model (not woven into it).

``apply_expert_parallel(model, ep_size)`` after peft (and ``fuse_moe``), before ``deepspeed.initialize``:

- process groups come from ``deepspeed.utils.groups._create_expert_and_data_parallel`` (the ones
  DeepSpeed's own MoE layer uses): EP groups of ``ep_size`` consecutive ranks, expert-data-parallel
  (EDP) groups across them, DP over the whole world for everything else;
- every MoE block keeps only its ``E / ep_size`` experts (frozen base and peft's expert LoRA factors,
  sliced in peft's layout), and its class is switched in place (as torch's FSDP2 does) to a subclass
  whose forward routes on the replicated router, sends each token slot to the rank that owns its expert
  with a dropless all-to-all of uneven splits, runs the local experts on the fused kernels (or the stock
  transformers path when the block is not fused) and brings the rows back the same way;
- expert parameters carry DeepSpeed's MoE marks (``allreduce=False``, ``group_name``) and the model gets
  one parameter-less ``deepspeed.moe.layer.MoE`` marker, so the engine reduces expert gradients over the
  EDP group (dividing by the full DP size, which keeps them equal to EP=1) and the rest over the world.

State-dict names never change, so ``with gathered_experts(model): ...`` is all it takes to save or load
the full peft adapter at any EP size: inside the block the sharded LoRA tensors hold all experts (an
all-gather), on exit each rank keeps its slice of whatever the tensors hold then.

We mirror AutoEP's group handling instead of extending ``deepspeed.module_inject.auto_ep``: as of
0.19.8 AutoEP has no gpt-oss preset (interleaved gate/up, biases, clamped SwiGLU), replaces the block
with its own router/experts (dropping peft's ``ParamWrapper`` LoRA) and cannot return gpt-oss's
``(hidden, router_scores)`` pair; see README, "Parallelism".
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from ossforge.model.fused_moe import FusedGptOssMLP, _unwrap_experts, fused_experts_call

_EP_CLASSES: dict[type, type] = {}


# ----------------------------------------------------------------------------- all-to-all


class _AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` with uneven splits; backward sends gradients back."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad.contiguous(), ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    """Rows ``x`` split by ``send_splits`` go to the group's ranks; returns rows received (by source rank)."""
    return _AllToAll.apply(x, send_splits, recv_splits, group)


# ----------------------------------------------------------------------------- the EP MoE block


class ExpertParallelMixin:
    """Forward of a gpt-oss MoE block whose experts are sharded over an EP group (dropless)."""

    ep_group = None
    ep_size: int = 1
    ep_rank: int = 0
    num_global_experts: int = 0

    def forward(self, hidden_states):
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)
        _, scores, indices = self.router(x)  # replicated router: [T, k] each
        top_k = indices.shape[1]
        local = self.num_global_experts // self.ep_size

        # Slots sorted by expert, hence by owning rank; counts per destination rank.
        flat = indices.reshape(-1)
        expert_of_row, perm = torch.sort(flat, stable=True)
        token_of_row = perm // top_k
        send_counts = torch.zeros(self.ep_size, dtype=torch.long, device=flat.device)
        send_counts.index_add_(0, expert_of_row // local, torch.ones_like(expert_of_row))  # no sync (bincount syncs on CUDA)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.ep_group)
        # The one host sync of the dispatch, one per MoE layer and forward: all_to_all_single takes its
        # split sizes as Python ints and the receive buffer's row count must be known to allocate it.
        send, recv = torch.stack([send_counts, recv_counts]).tolist()

        rows = x[token_of_row]
        if torch.is_grad_enabled() and not rows.requires_grad:
            rows = rows.detach().requires_grad_()  # every rank must join the backward all-to-alls
        recv_rows = all_to_all(rows, send, recv, self.ep_group)
        recv_experts = torch.empty(sum(recv), dtype=flat.dtype, device=flat.device)
        dist.all_to_all_single(recv_experts, expert_of_row.contiguous(), recv, send, group=self.ep_group)

        out_rows = self._local_experts(recv_rows, (recv_experts - self.ep_rank * local).unsqueeze(1))
        if torch.is_grad_enabled() and not out_rows.requires_grad and recv_rows.requires_grad:
            out_rows = out_rows + 0 * recv_rows  # a rank that received no rows still answers in backward
        back = all_to_all(out_rows.to(x.dtype), recv, send, self.ep_group)

        weights = scores.reshape(-1)[perm].unsqueeze(1)
        out = torch.zeros_like(x).index_add_(0, token_of_row, (back * weights).to(x.dtype))
        return out.reshape(batch, seq, hidden), scores

    def _local_experts(self, rows, local_index):
        """Outputs of this rank's experts for ``rows`` (each row routed to one local expert, weight 1)."""
        ones = torch.ones(local_index.shape, dtype=rows.dtype, device=rows.device)
        fused = _fused_call(self)
        if fused is not None:
            return fused(rows, ones, local_index)
        return self.experts(rows, local_index, ones)


def _fused_call(mlp):
    """``f(rows, weights, index)`` on ossforge's fused kernels when ``fuse_moe`` switched this block."""
    return fused_experts_call(mlp) if isinstance(mlp, FusedGptOssMLP) else None


def _ep_class(cls: type) -> type:
    if issubclass(cls, ExpertParallelMixin):
        return cls
    if cls not in _EP_CLASSES:
        _EP_CLASSES[cls] = type(f"ExpertParallel{cls.__name__}", (ExpertParallelMixin, cls), {})
    return _EP_CLASSES[cls]


def _is_moe_block(module: nn.Module) -> bool:
    return hasattr(module, "router") and hasattr(module, "experts") and hasattr(module.router, "top_k")


# ----------------------------------------------------------------------------- sharding


def _slice_b(tensor: torch.Tensor, experts: int, rank: int, ep: int) -> torch.Tensor:
    out = tensor.shape[0]
    local = experts // ep
    return tensor.reshape(out, -1, ep, local)[:, :, rank].reshape(out, -1)


def _join_b(parts: list[torch.Tensor], experts: int) -> torch.Tensor:
    out = parts[0].shape[0]
    local = experts // len(parts)
    return torch.stack([p.reshape(out, -1, local) for p in parts], dim=2).reshape(out, -1)


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    new = nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad)
    setattr(module, name, new)


def _mark(param: nn.Parameter, kind: str, experts: int, group_name: str) -> None:
    """DeepSpeed's MoE-parameter marks, plus how to gather the full tensor back."""
    param.allreduce = False
    param.group_name = group_name
    param.ep_kind = kind
    param.ep_experts = experts


def _global_experts(experts: nn.Module) -> int:
    """Experts of the whole layer (a rank-sharded load leaves only the local ones in the module)."""
    return getattr(experts, "num_global_experts", experts.num_experts)


def _shard_block(mlp: nn.Module, rank: int, ep: int, group_name: str) -> None:
    """Keep this rank's experts (base and LoRA) and mark them; a block loaded rank-sharded
    (``ossforge.model.local_experts``) already holds only them and is only checked and marked."""
    experts, wrappers = _unwrap_experts(mlp.experts)
    total = _global_experts(experts)
    n = total // ep
    presharded = getattr(experts, "expert_range", (0, total)) != (0, total)
    if presharded and tuple(experts.expert_range) != (rank * n, (rank + 1) * n):
        raise ValueError(f"experts were loaded for global experts {experts.expert_range}, but EP rank {rank} "
                         f"of {ep} owns {rank * n}..{(rank + 1) * n - 1}")
    for name in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
        if not presharded:
            _replace(experts, name, getattr(experts, name)[rank * n:(rank + 1) * n])
        _mark(getattr(experts, name), "base", total, group_name)
    experts.num_experts = n
    experts.num_global_experts, experts.expert_range = total, (rank * n, (rank + 1) * n)
    for wrapper in wrappers.values():
        wrapper.num_experts = n
        if presharded:  # peft created the LoRA at the local size, in its layout
            for adapter in list(wrapper.lora_A.keys()):
                _mark(wrapper.lora_A[adapter].weight, "A", total, group_name)
                _mark(wrapper.lora_B[adapter].weight, "B", total, group_name)
            continue
        for adapter in list(wrapper.lora_A.keys()):
            a, b = wrapper.lora_A[adapter], wrapper.lora_B[adapter]
            rows = a.weight.shape[0] // ep  # r x local experts
            _replace(a, "weight", a.weight[rank * rows:(rank + 1) * rows])
            _replace(b, "weight", _slice_b(b.weight, total, rank, ep))
            a.out_features, b.in_features = a.weight.shape[0], b.weight.shape[1]
            _mark(a.weight, "A", total, group_name)
            _mark(b.weight, "B", total, group_name)


class _MoEGroupsMarker(nn.Module):
    """Parameter-less ``deepspeed.moe.layer.MoE`` the engine sees: it turns on DeepSpeed's MoE gradient
    reduction and (re)uses our EP groups. It holds no experts, so DeepSpeed's per-expert checkpoint
    files stay empty; expert weights are saved gathered (see ``gathered_experts``)."""

    def __init__(self, ep_size: int, num_experts: int):
        nn.Module.__init__(self)
        self.ep_size = ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.num_experts = num_experts
        self.num_local_experts = 0  # no per-expert checkpoint files to write or read
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        from deepspeed.utils import groups

        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(self.ep_size)

    def forward(self, *args, **kwargs):  # never called
        raise RuntimeError("marker module")


def _marker_class():
    from deepspeed.moe.layer import MoE

    return type("ExpertParallelGroups", (_MoEGroupsMarker, MoE), {})


def apply_expert_parallel(model: nn.Module, ep_size: int) -> nn.Module:
    """Shard ``model``'s experts over EP groups of ``ep_size`` ranks, in place; returns ``model``.

    Needs ``torch.distributed`` initialised (``deepspeed.init_distributed()``) when ``ep_size > 1``; a
    no-op at 1. Raises ValueError if ``ep_size`` divides neither the experts nor the world size.
    """
    if ep_size == 1:
        return model
    from deepspeed.utils import groups

    if not dist.is_initialized():
        raise RuntimeError("expert parallelism needs torch.distributed (call deepspeed.init_distributed())")
    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"parallel.expert_parallel_size {ep_size} does not divide the world size {world}")
    blocks = [m for m in model.modules() if _is_moe_block(m)]
    if not blocks:
        raise ValueError("no gpt-oss MoE block found in the model")
    num_experts = _global_experts(_unwrap_experts(blocks[0].experts)[0])
    if num_experts % ep_size:
        raise ValueError(f"parallel.expert_parallel_size {ep_size} does not divide the {num_experts} experts")

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    group = groups._get_expert_parallel_group(name)
    rank = groups._get_expert_parallel_rank(name)
    for mlp in blocks:
        _shard_block(mlp, rank, ep_size, name)
        mlp.__class__ = _ep_class(type(mlp))
        mlp.ep_group, mlp.ep_size, mlp.ep_rank, mlp.num_global_experts = group, ep_size, rank, num_experts
    model.add_module("ossforge_expert_parallel", _marker_class()(ep_size, num_experts))
    return model


def expert_parallel_group(model: nn.Module):
    """The EP process group of ``model``'s sharded experts (None at EP=1)."""
    for module in model.modules():
        if isinstance(module, ExpertParallelMixin):
            return module.ep_group
    return None


def expert_parallel_size(model: nn.Module) -> int:
    """EP size ``apply_expert_parallel`` gave ``model`` (1 if none)."""
    for module in model.modules():
        if isinstance(module, ExpertParallelMixin):
            return module.ep_size
    return 1


# ----------------------------------------------------------------------------- EP-independent state


def _sharded_params(model: nn.Module, trainable_only: bool):
    for param in model.parameters():
        if hasattr(param, "ep_kind") and (param.requires_grad or not trainable_only):
            yield param


@contextlib.contextmanager
def gathered_experts(model: nn.Module, trainable_only: bool = True, optimizer=None, masters=()):
    """Inside the block every sharded expert tensor (by default only the LoRA factors) holds all
    experts, as at EP=1; on exit each rank keeps its slice of the values then present.

    A collective: every rank of the world must enter. Save the adapter inside (rank 0 writes), or load
    a full adapter inside (``set_peft_model_state_dict``) to shard it at load. ``optimizer``: a torch
    optimizer whose per-parameter state tensors (Adam moments) are gathered and re-sliced alike.
    ``masters``: more sharded tensors to gather alike (fp32 master copies, carrying ``ep_kind``).
    """
    ep = expert_parallel_size(model)
    if ep == 1:
        yield model
        return
    from deepspeed.utils import groups

    name = f"ep_size_{ep}"
    group = groups._get_expert_parallel_group(name)
    rank = groups._get_expert_parallel_rank(name)
    params = list(_sharded_params(model, trainable_only)) + list(masters)

    def states(param):
        """Optimizer state tensors shaped like ``param`` (Adam's moments), as (state dict, key) pairs."""
        if optimizer is None:
            return []
        state = optimizer.state.get(param, {})
        return [(state, key) for key, value in state.items()
                if torch.is_tensor(value) and value.shape == param.shape]

    def gather(t: torch.Tensor, kind: str, experts: int) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(ep)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return _join_b(parts, experts) if kind == "B" else torch.cat(parts, 0)

    def local(t: torch.Tensor, kind: str, experts: int) -> torch.Tensor:
        if kind == "B":
            return _slice_b(t, experts, rank, ep)
        n = t.shape[0] // ep
        return t[rank * n:(rank + 1) * n]

    saved = []
    with torch.no_grad():
        for p in params:
            for state, key in states(p):
                state[key] = gather(state[key], p.ep_kind, p.ep_experts)
            saved.append((p, p.data))
            p.data = gather(p.data, p.ep_kind, p.ep_experts)
    try:
        yield model
    finally:
        # Slice what the tensors hold now: a load inside the block may have replaced params and states.
        with torch.no_grad():
            for p, storage in saved:
                for state, key in states(p):
                    state[key] = local(state[key], p.ep_kind, p.ep_experts).clone()
                storage.copy_(local(p.data, p.ep_kind, p.ep_experts))
                p.data = storage


def _ep_independent_optimizer(optimizer):
    """(torch optimizer whose state to gather, fp32 masters to gather) for a DeepSpeed optimizer; (None, ())
    where the optimizer state is not one we can make EP-independent."""
    if isinstance(optimizer, torch.optim.Optimizer) and type(optimizer).__module__.startswith("torch."):
        return optimizer, ()
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(optimizer, FP16_UnfusedOptimizer):  # ZeRO-0 bf16: fp32 master per bf16 parameter
        masters = []
        for low_group, master_group in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            for low, master in zip(low_group, master_group):
                if hasattr(low, "ep_kind"):
                    master.ep_kind, master.ep_experts = low.ep_kind, low.ep_experts
                    masters.append(master)
        return optimizer.optimizer, masters
    return None, ()


def optimizer_param_groups(model: nn.Module) -> list[dict]:
    """Trainable parameters as optimizer groups that do not depend on EP: non-expert, then expert LoRA.

    At EP > 1 the expert group carries DeepSpeed's ``moe: True`` and EP group name, as its bf16 and ZeRO
    optimizers require; the group count and sizes stay those of EP=1, so optimizer checkpoints load
    at any EP size.
    """
    ep = expert_parallel_size(model)
    dense, experts = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (experts if hasattr(param, "ep_kind") or ".experts." in name else dense).append(param)
    groups = [{"params": dense, "name": "dense-params"}]
    if experts:
        group = {"params": experts, "name": "expert-params"}
        if ep > 1:
            group.update(moe=True, name=f"ep_size_{ep}")
        groups.append(group)
    return [g for g in groups if g["params"]]


@contextlib.contextmanager
def ep_independent(engine):
    """Inside: ``engine`` looks like an EP=1 run to checkpoint code (full experts everywhere).

    Wrap ``engine.save_checkpoint`` / ``engine.load_checkpoint`` and adapter saving in it, on every rank:
    the files then equal an EP=1 run's and load at any EP size. With a plain torch optimizer (ZeRO-0,
    fp32) its Adam moments are gathered too, and with DeepSpeed's bf16 ZeRO-0 wrapper
    (``FP16_UnfusedOptimizer``) also its fp32 master copies and their moments; DeepSpeed's MoE
    checkpoint layout is switched off for the block. ZeRO-1/2 keep flat per-rank fp32 partitions:
    they are refused with EP (``plan.check_topology``).
    """
    model = getattr(engine, "module", engine)
    if expert_parallel_size(model) == 1:
        yield engine
        return
    optimizer, masters = _ep_independent_optimizer(getattr(engine, "optimizer", None))
    with gathered_experts(model, optimizer=optimizer, masters=masters):
        had_moe = getattr(engine, "has_moe_layers", False)
        if optimizer is not None and hasattr(engine, "has_moe_layers"):
            engine.has_moe_layers = False  # one model-states file holding everything, as at EP=1
        try:
            yield engine
        finally:
            if hasattr(engine, "has_moe_layers"):
                engine.has_moe_layers = had_moe
