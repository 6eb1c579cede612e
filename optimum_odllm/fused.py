"""Inference-time fusion of low-rank factors that read the same input (q/k/v, gate/up).

After OD-LLM, each projection is two GEMMs. Sibling projections fed the very same tensor can share
one ``down`` GEMM over their concatenated factors (``[r_q + r_k + r_v, in]``): fewer, larger
kernels, which matters most for small-batch decoding where launch count and thin GEMMs dominate.
The first sibling computes the shared product and hands each follower its slice; a follower called
with any other input falls back to its own slice of the weight, so results never depend on call
order. This is a pure inference transform (the fused model is not meant to be saved): call
:func:`fuse_shared_inputs` after loading, before ``torch.compile`` / ``generate``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lowrank import LowRankLinear, set_submodule


class FusedDownLeader(nn.Module):
    """First sibling: one GEMM for all siblings' ``down`` factors, then its own ``up``."""

    def __init__(self, members: list[LowRankLinear]):
        super().__init__()
        self.in_features = members[0].in_features
        self.out_features = members[0].out_features
        self.splits = [m.rank for m in members]
        weight = torch.cat([m.down.weight.detach() for m in members], dim=0)
        self.down = nn.Linear(self.in_features, weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.down.weight.copy_(weight)
        self.up = members[0].up
        self._followers: tuple["FusedDownFollower", ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.down(x).split(self.splits, dim=-1)
        for follower, part in zip(self._followers, parts[1:]):
            follower._pending_input = x
            follower._pending = part
        return self.up(parts[0])


class FusedDownFollower(nn.Module):
    """Later sibling: reuses the leader's product when called on the same input."""

    def __init__(self, member: LowRankLinear, leader: FusedDownLeader, start: int):
        super().__init__()
        self.in_features = member.in_features
        self.out_features = member.out_features
        self.rank = member.rank
        self.up = member.up
        self._leader = (leader,)  # a tuple: not a registered submodule (no duplicate parameters)
        self._start = start
        self._pending_input: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._pending_input is x and self._pending is not None:
            part = self._pending
        else:
            weight = self._leader[0].down.weight[self._start : self._start + self.rank]
            part = F.linear(x, weight)
        self._pending_input = None
        self._pending = None
        return self.up(part)


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


def fuse_shared_inputs(model: nn.Module) -> int:
    """Fuse the ``down`` factors of sibling low-rank modules in place; returns the number of groups fused."""
    device = next(model.parameters()).device
    probe = torch.ones((1, 2), dtype=torch.long, device=device)
    fused = 0
    for names in _sibling_groups(model, probe):
        members = [model.get_submodule(n) for n in names]
        leader = FusedDownLeader(members)
        followers = []
        start = members[0].rank
        for name, member in zip(names[1:], members[1:]):
            follower = FusedDownFollower(member, leader, start)
            start += member.rank
            set_submodule(model, name, follower)
            followers.append(follower)
        leader._followers = tuple(followers)
        set_submodule(model, names[0], leader)
        fused += 1
    return fused
