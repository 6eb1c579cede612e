"""Inference-time fusion of low-rank factors that read the same input (q/k/v, gate/up).

After OD-LLM, each projection is two GEMMs. Sibling projections fed the very same tensor can share
one ``down`` GEMM over their stacked factors (``[r_q + r_k + r_v, in]``), and, on CUDA at small token
counts, one grouped launch for their ``up`` factors: fewer, larger kernels, which is what small-batch
decoding needs.

The model keeps its structure: every projection stays a :class:`LowRankLinear` with its own
``down.weight`` parameter, now a *view* into the group's stacked weight (no second copy). State-dict
keys, parameter counts, ``merge_lowrank``, ``load_state_dict`` (which writes through the views) and
``save_pretrained`` therefore behave as before fusion; :func:`unfuse_shared_inputs` gives every
factor its own storage back, bit for bit. The first sibling called with an input computes all
siblings' outputs; each sibling then takes its own, and a sibling called with any other input
recomputes, so results never depend on call order.
"""

from __future__ import annotations

import torch
from torch import nn

from .lowrank import LowRankLinear, _is_plain_linear, lowrank_outputs

_GROUP_ATTR = "_odllm_group"


class SharedInputGroup:
    """Siblings whose ``down`` weights are row blocks of one stacked tensor (a plain object, not a module)."""

    def __init__(self, members: list[LowRankLinear]):
        self.members = list(members)
        self.weight = torch.empty(0)
        self._input: torch.Tensor | None = None
        self._outputs: list[torch.Tensor] = []
        self._taken: list[bool] = []
        self.stack()

    def stack(self) -> None:
        """(Re)build the stacked weight from the members' current factors and alias each member to its rows."""
        with torch.no_grad():
            weight = torch.cat([m.down.weight.detach() for m in self.members], dim=0)
        start = 0
        for member in self.members:
            old = member.down.weight
            member.down.weight = nn.Parameter(weight[start : start + member.rank], requires_grad=old.requires_grad)
            start += member.rank
        self.weight = weight
        self._clear()

    def is_aliased(self) -> bool:
        """False once something gave a member's factor new storage (``.to()``, ``deepcopy``, ``assign=True``)."""
        base = self.weight.data_ptr()
        row = self.weight.stride(0) * self.weight.element_size()
        start = 0
        for member in self.members:
            w = member.down.weight
            if w.device != self.weight.device or w.dtype != self.weight.dtype or w.data_ptr() != base + start * row:
                return False
            start += member.rank
        return True

    def _clear(self) -> None:
        self._input, self._outputs, self._taken = None, [], []

    def __call__(self, member: LowRankLinear, x: torch.Tensor) -> torch.Tensor:
        index = self.members.index(member)
        if self._input is not x or self._taken[index]:
            if not torch.compiler.is_compiling() and not self.is_aliased():
                self.stack()
            ups = [m.up.weight for m in self.members]
            self._outputs = lowrank_outputs(x, self.weight, ups, [m.up.bias for m in self.members])
            self._input = x
            self._taken = [False] * len(self.members)
        out = self._outputs[index]
        self._taken[index] = True
        if all(self._taken):
            self._clear()  # hold no activations between forward passes
        return out


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
    weights = [m.down.weight for m in members]
    return (
        all(_is_plain_linear(m.down) and _is_plain_linear(m.up) for m in members)
        and len({(w.device, w.dtype) for w in weights}) == 1
        and weights[0].device.type != "meta"
    )


def fuse_shared_inputs(model: nn.Module) -> int:
    """Fuse the ``down`` factors of sibling low-rank modules in place; returns the number of groups fused.

    Idempotent (an already fused model is unfused first). Finds siblings with one 2-token forward pass.
    """
    unfuse_shared_inputs(model)
    device = next(model.parameters()).device
    probe = torch.ones((1, 2), dtype=torch.long, device=device)
    fused = 0
    for names in _sibling_groups(model, probe):
        members = [model.get_submodule(n) for n in names]
        if not _fusable(members):
            continue
        group = SharedInputGroup(members)
        for member in members:
            member.__dict__[_GROUP_ATTR] = group
        fused += 1
    return fused


def unfuse_shared_inputs(model: nn.Module) -> int:
    """Give every fused factor its own storage again (exact inverse of :func:`fuse_shared_inputs`).

    Returns the number of groups undone. Values are copied bit for bit; ``requires_grad`` is kept.
    """
    groups = {id(g): g for m in model.modules() if (g := m.__dict__.get(_GROUP_ATTR)) is not None}
    for group in groups.values():
        for member in group.members:
            old = member.down.weight
            member.down.weight = nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad)
            member.__dict__.pop(_GROUP_ATTR, None)
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
