"""Layer-at-a-time activation plumbing: find the decoder blocks, capture their inputs, collect statistics.

As in GPTQ, the model runs only up to the first decoder layer (a pre-forward hook stops it), after
which each layer is fed the stored hidden states directly. Only one layer's activations live at a
time, so the model itself can stay on the CPU while each layer visits the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .linalg import accumulate_covariance, accumulate_cross_covariance, check_finite


class _StopForward(Exception):
    """Raised by the capture hook once the first decoder layer's inputs are stored."""


@dataclass
class LayerInputs:
    """Hidden states of each calibration batch plus the keyword arguments the layer was called with."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    token_masks: list[torch.Tensor]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, Any], torch.Tensor]]:
        return iter(zip(self.hidden, self.kwargs, self.token_masks))

    def with_hidden(self, hidden: list[torch.Tensor]) -> "LayerInputs":
        return LayerInputs(hidden, self.kwargs, self.token_masks)


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of decoder blocks (``model.layers``, ``transformer.h``, ...).

    We take the ModuleList whose length equals ``config.num_hidden_layers`` (or the longest one),
    which works for Llama/Qwen2/Mistral/Phi/Gemma/GPT-2 style models without per-architecture code.
    """
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod)]
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of decoder layers; OD-LLM needs a decoder-only LM.")
    matching = [c for c in candidates if expected is not None and len(c[1]) == expected]
    return (matching or sorted(candidates, key=lambda c: -len(c[1])))[0]


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_first_layer_inputs(
    model: nn.Module,
    first_layer: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    storage_device: torch.device,
) -> LayerInputs:
    """Run the model's prefix (embeddings, rotary tables, masks) and keep what layer 0 receives."""
    captured: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured["hidden"] = hidden
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    inputs = LayerInputs([], [], [])
    model_device = next(model.parameters()).device
    try:
        for ids, mask in batches:
            try:
                model(input_ids=ids.to(model_device), attention_mask=mask.to(model_device), use_cache=False)
            except _StopForward:
                pass
            else:  # pragma: no cover - defensive: the hook must fire
                raise RuntimeError("The first decoder layer was never called during calibration.")
            kwargs = captured["kwargs"]
            kwargs.pop("past_key_values", None)
            kwargs.pop("past_key_value", None)
            kwargs["use_cache"] = False
            inputs.hidden.append(captured["hidden"].to(storage_device))
            inputs.kwargs.append(_to(kwargs, storage_device))
            inputs.token_masks.append(mask.bool().to(storage_device))
    finally:
        handle.remove()
    return inputs


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], device: torch.device) -> torch.Tensor:
    """Call one decoder layer on stored inputs, whatever it returns (tensor or tuple)."""
    out = layer(hidden.to(device), **_to(kwargs, device))
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class InputStatistics:
    """Per input group: ``X^T X`` of the inputs seen and, for alignment, ``X^T X_ref`` against references.

    Modules fed the very same tensor (q/k/v, gate/up) share one group, named after the first of them.
    """

    covariance: dict[str, torch.Tensor] = field(default_factory=dict)
    cross_covariance: dict[str, torch.Tensor] = field(default_factory=dict)
    group_of: dict[str, str] = field(default_factory=dict)


class ActivationHooks:
    """Forward pre-hooks on a layer's target Linears, in one of two modes per forward pass.

    ``record``: keep this batch's input of every group (the original model's ``X_ref``).
    ``accumulate``: add ``X^T X`` (and ``X^T X_ref`` if references were recorded) to the statistics.
    """

    def __init__(self, modules: dict[str, nn.Module], dtype: torch.dtype, layer_name: str = ""):
        self.modules = modules
        self.dtype = dtype
        self.layer_name = layer_name
        self.stats = InputStatistics()
        self.mode: str | None = None
        self.token_mask: torch.Tensor | None = None
        self.recorded: dict[str, torch.Tensor] = {}
        self._seen: dict[tuple, str] = {}
        self._alive: list[torch.Tensor] = []
        self._handles = [m.register_forward_pre_hook(self._make_hook(n)) for n, m in modules.items()]

    def _make_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if self.mode is None:
                return
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            group = self.stats.group_of.get(name)
            if group is None:
                # Holding the tensor keeps its memory from being reused by a later module's input in
                # this forward pass, so equal data pointers really mean the same tensor.
                self._alive.append(x)
                group = self._seen.setdefault(key, name)
                self.stats.group_of[name] = group
            if group != name:
                return  # another module already handled this very tensor
            check_finite(x, f"input activations of {self.layer_name}{name}")
            if self.mode == "record":
                self.recorded[group] = x.detach()
            else:
                stats = self.stats
                stats.covariance[group] = accumulate_covariance(stats.covariance.get(group), x, self.token_mask, self.dtype)
                if group in self.recorded:
                    stats.cross_covariance[group] = accumulate_cross_covariance(
                        stats.cross_covariance.get(group), x, self.recorded[group], self.token_mask, self.dtype
                    )

        return hook

    def forward(self, mode: str, layer: nn.Module, hidden: torch.Tensor, kwargs: dict, mask: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Run ``layer`` once with the hooks in ``mode``."""
        self.mode, self.token_mask, self._seen, self._alive = mode, mask.to(device), {}, []
        try:
            return run_layer(layer, hidden, kwargs, device)
        finally:
            self.mode, self._alive = None, []

    def clear_recorded(self) -> None:
        self.recorded = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
