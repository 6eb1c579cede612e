"""Inference-time fusion of low-rank factors that read the same input (q/k/v, gate/up).

After OD-LLM, each projection is two GEMMs. Sibling projections fed the very same tensor share one
``down`` GEMM over their stacked factors (``[r_q + r_k + r_v, in]``). Inside ``torch.compile`` or a
CUDA-graph capture, siblings whose ``up`` factors have one shape (q/k/v of a multi-head model, k/v under
grouped-query attention, gate/up) also share one batched ``up`` product (``bmm``, or ``baddbmm`` with
biases) over their stacked ``[n, out, r]`` weights, unless the Triton kernels of
:mod:`optimum_odllm.kernels` take the step (CUDA, few tokens). Eagerly each ``up`` stays one GEMM by
default (``batch_ups="graphs"``): eager decoding is bound by host time, which the view ops around a batched
product add to, and it measured behind there (see :func:`_in_graph`); ``batch_ups="always"`` batches them
eagerly too, ``"never"`` nowhere.

The model keeps its structure: every projection stays a :class:`LowRankLinear` with its own
``down.weight``/``up.weight``/``up.bias`` parameters, now *views* into the group's stacked tensors (no
second copy). State-dict keys, parameter counts, ``merge_lowrank``, ``load_state_dict`` (which writes
through the views) and ``save_pretrained`` therefore behave as before fusion; :func:`unfuse_shared_inputs`
gives every factor its own storage back, bit for bit. The first sibling called with an input computes
all siblings' outputs; each sibling then takes its own, and a sibling called with any other input
recomputes, so results never depend on call order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .lowrank import LowRankLinear, _is_plain_linear, lowrank_outputs, needs_grad

_GROUP_ATTR = "_odllm_group"
_HOOK_ATTR = "_odllm_group_load_hook"
BatchUps = Literal["graphs", "always", "never"]  # where equal-shaped up factors share one batched product
BATCH_UPS: tuple[str, ...] = get_args(BatchUps)


def _restack_after_load(module: nn.Module, incompatible_keys: object) -> None:
    """``load_state_dict(..., assign=True)`` replaces the members' tensors: restack now, not at the next eager
    call (a compiled call cannot check data pointers and would read the old stacks)."""
    group = module.__dict__.get(_GROUP_ATTR)
    if group is not None and group.plain() and not group.is_aliased():
        group.stack()


@dataclass(frozen=True)
class UpBatch:
    """Consecutive members whose ``up`` factors share a shape: one batched product for all of them."""

    members: range  # indices into the group's members
    columns: tuple[int, int]  # their slice of the stacked down output
    rank: int
    weight_t: torch.Tensor | None  # [n, rank, out]: transposed view of the stacked up weights (None: one member)
    bias: torch.Tensor | None  # [n, 1, out] stacked biases, or None


def _check_batch_ups(batch_ups: object) -> None:
    if batch_ups not in BATCH_UPS:
        raise ValueError(f"batch_ups must be one of {BATCH_UPS}, got {batch_ups!r}")


def _batch_runs(members: list[LowRankLinear]) -> list[range]:
    """Maximal runs of consecutive members with equal ``up`` shape and bias presence (call order kept)."""
    def key(m: LowRankLinear) -> tuple:
        return (tuple(m.up.weight.shape), m.up.bias is not None)

    runs, start = [], 0
    for i in range(1, len(members) + 1):
        if i == len(members) or key(members[i]) != key(members[start]):
            runs.append(range(start, i))
            start = i
    return runs


def _alias_rows(params: list[nn.Parameter], stacked: torch.Tensor) -> list[nn.Parameter]:
    """New parameters that are views ``stacked[i]`` (``requires_grad`` kept)."""
    return [nn.Parameter(stacked[i], requires_grad=p.requires_grad) for i, p in enumerate(params)]


def _all_plain(members: list[LowRankLinear]) -> bool:
    """Every member's ``down`` and ``up`` are plain ``nn.Linear`` (no peft adapter, hook or offload wrapper)."""
    return all(_is_plain_linear(m._modules["down"]) and _is_plain_linear(m._modules["up"]) for m in members)


def _in_graph(x: torch.Tensor) -> bool:
    """Inside ``torch.compile`` or a CUDA-graph capture, where the batched ``up`` products pay.

    H200, Llama-7B shape, compiled decode timed round-robin (benchmarks/README.md 4f/4g, 2026-12-03): batch 1 1.17x /
    1.16x dense with them, 1.10x / 1.16x with one ``up`` GEMM per projection (not resolved); batch 32 1.21x vs 1.16x;
    fewer, larger products is also what graphs exported from a fused model hold. Eager decoding is bound by host
    time, which the view ops around ``bmm`` add to: round-robin on the H200 (``batch_ups="always"``) they were behind
    at batch 1 (0.74x vs 0.81x dense, rounds overlapping) and tied at batch 32 (0.80x); on a CPU the recommender's
    users/s tied (1.27x vs 1.26x dense) while its decode and prefill steps were slower with them.
    """
    return torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing())


class SharedInputGroup:
    """Siblings whose ``down`` weights are row blocks of one stacked tensor (a plain object, not a module)."""

    def __init__(self, members: list[LowRankLinear], batch_ups: BatchUps = "graphs"):
        _check_batch_ups(batch_ups)
        self.members = list(members)
        self.batch_ups = batch_ups
        self.weight = torch.empty(0)
        self.batches: list[UpBatch] = []
        self._pointers: list[int] = []
        self._input: torch.Tensor | None = None
        self._outputs: list[torch.Tensor] = []
        self._taken: list[bool] = []
        self.stack()

    def plain(self) -> bool:
        """Every member's factors are plain ``nn.Linear`` (no adapter or hook wrapped one since fusion)."""
        return _all_plain(self.members)

    def _matches_members(self) -> bool:
        """The stacks have the members' dtype and device (``.to()``/``.half()``/``.cuda()`` change both at once).

        The one staleness check that works inside ``torch.compile`` (data pointers do not); loading with
        ``assign=True`` restacks through a load hook, so the stacks never hold other values than the members."""
        first = self.members[0]._modules["down"]._parameters["weight"]
        return self.weight.dtype == first.dtype and self.weight.device == first.device

    def _aliased_parameters(self) -> list[torch.Tensor]:
        """Every parameter that must be a view of the stacks (read live, not through nn.Module.__getattr__)."""
        params = [m._modules["down"]._parameters["weight"] for m in self.members]
        for batch in self.batches:
            if batch.weight_t is not None:
                for i in batch.members:
                    up = self.members[i]._modules["up"]._parameters
                    params.append(up["weight"])
                    if batch.bias is not None:
                        params.append(up["bias"])
        return params

    def stack(self) -> None:
        """(Re)build the stacked weights from the members' current factors and alias each member to its rows."""
        with torch.no_grad():
            weight = torch.cat([m.down.weight.detach() for m in self.members], dim=0)
        start = 0
        for member in self.members:
            old = member.down.weight
            member.down.weight = nn.Parameter(weight[start : start + member.rank], requires_grad=old.requires_grad)
            start += member.rank
        self.weight = weight
        self.batches = []
        column = 0
        runs = _batch_runs(self.members) if self.batch_ups != "never" else [range(i, i + 1) for i in range(len(self.members))]
        for run in runs:
            group = [self.members[i] for i in run]
            rank = group[0].rank
            width = rank * len(group)
            stacked_weight = stacked_bias = None
            if len(group) > 1:
                with torch.no_grad():
                    stacked_weight = torch.stack([m.up.weight.detach() for m in group])
                    if group[0].up.bias is not None:
                        stacked_bias = torch.stack([m.up.bias.detach() for m in group])[:, None, :]
                for m, p in zip(group, _alias_rows([m.up.weight for m in group], stacked_weight)):
                    m.up.weight = p
                if stacked_bias is not None:
                    for m, p in zip(group, _alias_rows([m.up.bias for m in group], stacked_bias[:, 0])):
                        m.up.bias = p
            weight_t = None if stacked_weight is None else stacked_weight.transpose(1, 2)
            self.batches.append(UpBatch(run, (column, column + width), rank, weight_t, stacked_bias))
            column += width
        self._pointers = [p.data_ptr() for p in self._aliased_parameters()]
        self._clear()

    def is_aliased(self) -> bool:
        """False once something gave a member's factor new storage (``.to()``, ``deepcopy``, ``assign=True``).

        The stacks are held here, so their memory cannot be reused while a member still views it: equal data
        pointers mean the member still reads the stack (and ``.to()`` / ``deepcopy`` / ``assign=True`` always
        allocate new storage)."""
        return [p.data_ptr() for p in self._aliased_parameters()] == self._pointers

    def _clear(self) -> None:
        self._input, self._outputs, self._taken = None, [], []

    def _batched_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One ``down`` GEMM, then one ``F.linear`` per lone member and one ``bmm``/``baddbmm`` per batch."""
        t = F.linear(x, self.weight)
        outputs: list[torch.Tensor] = []
        for batch in self.batches:
            part = t[..., batch.columns[0] : batch.columns[1]]
            if batch.weight_t is None:
                up = self.members[batch.members[0]].up
                outputs.append(F.linear(part, up.weight, up.bias))
                continue
            # [..., n * r] -> [n, tokens, r]: a strided view of the contiguous down output, read without a copy
            per_member = part.view(-1, len(batch.members), batch.rank).transpose(0, 1)
            if batch.bias is None:
                y = torch.bmm(per_member, batch.weight_t)
            else:
                y = torch.baddbmm(batch.bias, per_member, batch.weight_t)
            outputs.extend(out.view(*x.shape[:-1], out.shape[-1]) for out in y.unbind(0))
        return outputs

    def __call__(self, member: LowRankLinear, x: torch.Tensor) -> torch.Tensor | None:
        """``member``'s output, or None where the member must use its own factors.

        The first sibling called with ``x`` checks every sibling and computes every sibling's output; the others
        only check their own two factors before taking theirs (eager decoding pays for each Python step).
        A member whose factors take a gradient steps aside (the stacks carry none), and so does the whole group
        once any sibling's factor is wrapped (peft adapter, hook)."""
        if torch.is_grad_enabled() and needs_grad(member):
            return None
        index = self.members.index(member)  # identity (modules do not define ==); survives deepcopy, unlike id()
        if self._input is x and not self._taken[index]:
            if not _all_plain([member]):  # wrapped since the group computed: its own factors, adapter or hook run
                return None
        else:
            if not self.plain():
                return None
            if not torch.compiler.is_compiling() and not self.is_aliased():
                self.stack()
            self._outputs = self._compute(x)
            self._input = x
            self._taken = [False] * len(self.members)
        out = self._outputs[index]
        self._taken[index] = True
        if all(self._taken):
            self._clear()  # hold no activations between forward passes
        return out

    def _compute(self, x: torch.Tensor) -> list[torch.Tensor]:
        tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not self._matches_members():  # compiled before any eager call after .to(): the members' own factors
            return [F.linear(F.linear(x, m.down.weight), m.up.weight, m.up.bias) for m in self.members]
        batched = self.batch_ups == "always" or (self.batch_ups == "graphs" and _in_graph(x))
        if batched and not kernels.use_kernels(x, tokens):  # the kernels are used in graphs only
            return self._batched_outputs(x)
        # the Triton kernels at few tokens in graphs; eager: one up GEMM per member
        ups = [m._modules["up"]._parameters for m in self.members]
        return lowrank_outputs(x, self.weight, [u["weight"] for u in ups], [u["bias"] for u in ups])


def _sibling_groups(model: nn.Module, probe: torch.Tensor) -> list[list[str]]:
    """Names of LowRankLinear modules that receive the identical input tensor in one forward pass."""
    groups: dict[tuple, list[str]] = {}
    alive: list[torch.Tensor] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            def hook(mod: nn.Module, args: tuple, name: str = name) -> None:
                alive.append(args[0])  # keep alive: equal pointers then mean the same tensor
                groups.setdefault((args[0].data_ptr(), tuple(args[0].shape)), []).append(name)

            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=probe, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [names for names in groups.values() if len(names) > 1]


def _fusable(members: list[LowRankLinear]) -> bool:
    """Plain factors on one device and dtype (peft adapters or offload hooks keep their own path)."""
    weights = [p for m in members for p in (m.down.weight, m.up.weight, m.up.bias) if p is not None]
    return (
        _all_plain(members)
        and len({(w.device, w.dtype) for w in weights}) == 1
        and weights[0].device.type != "meta"
    )


def fuse_shared_inputs(model: nn.Module, batch_ups: BatchUps = "graphs") -> int:
    """Fuse the ``down`` factors of sibling low-rank modules in place; returns the number of groups fused.

    ``batch_ups``: where siblings' equal-shaped ``up`` factors share one batched product: ``"graphs"`` (default:
    inside ``torch.compile``/CUDA-graph capture, unless the Triton kernels take the step), ``"always"`` (eager
    too) or ``"never"`` (one ``up`` GEMM per projection, the earlier fusion, for comparisons).
    Idempotent (an already fused model is unfused first). Finds siblings with one 2-token forward pass.
    """
    _check_batch_ups(batch_ups)
    unfuse_shared_inputs(model)
    device = next(model.parameters()).device
    probe = torch.ones((1, 2), dtype=torch.long, device=device)
    fused = 0
    for names in _sibling_groups(model, probe):
        members = [model.get_submodule(n) for n in names]
        if not _fusable(members):
            continue
        group = SharedInputGroup(members, batch_ups)
        for member in members:
            member.__dict__[_GROUP_ATTR] = group
            member.__dict__[_HOOK_ATTR] = member.register_load_state_dict_post_hook(_restack_after_load)
        fused += 1
    return fused


def unfuse_shared_inputs(model: nn.Module) -> int:
    """Give every fused factor its own storage again (exact inverse of :func:`fuse_shared_inputs`).

    Returns the number of groups undone. Values are copied bit for bit; ``requires_grad`` is kept.
    """
    groups = {id(g): g for m in model.modules() if (g := m.__dict__.get(_GROUP_ATTR)) is not None}
    for group in groups.values():
        for member in group.members:
            for factor, name in ((member.down, "weight"), (member.up, "weight"), (member.up, "bias")):
                factor = getattr(factor, "base_layer", factor)  # a peft-wrapped factor keeps its weight there
                old = getattr(factor, name)
                if old is not None:
                    setattr(factor, name, nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad))
            member.__dict__.pop(_GROUP_ATTR, None)
            hook = member.__dict__.pop(_HOOK_ATTR, None)
            if hook is not None:
                hook.remove()
        group._clear()
    return len(groups)


def is_fused(model: nn.Module) -> bool:
    """Whether any module of ``model`` belongs to a shared-input group."""
    return any(m.__dict__.get(_GROUP_ATTR) is not None for m in model.modules())


def fuse_at_load(model: nn.Module) -> int:
    """Fusion as the loader applies it: only where safe (one device per model, no offload, no meta weights).

    For users and serving code after ``from_pretrained`` (the loader does not fuse by itself: fused factors were
    not faster everywhere, benchmarks/README.md section 4); returns 0 and changes nothing for models dispatched
    over several devices or offloaded by accelerate (their hooks move weights).
    """
    device_map = getattr(model, "hf_device_map", None)
    if device_map and len(set(device_map.values())) > 1:
        return 0
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        return 0
    if any(p.device.type == "meta" for p in model.parameters()):
        return 0
    return fuse_shared_inputs(model)
