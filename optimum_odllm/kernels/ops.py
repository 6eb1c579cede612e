"""The kernels as PyTorch custom ops (``torch.ops.odllm.*``), so ``torch.compile`` and CUDA graphs keep them.

``custom_op`` makes each kernel one opaque node: Dynamo traces through the model without breaking
the graph, Inductor calls the op as is, and CUDA-graph capture records its launches. ``register_fake``
gives the output shape without running it. Off CUDA (or without Triton) the same ops compute the plain
``F.linear`` result, so a graph traced with them still runs anywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .capabilities import HAS_TRITON, KERNEL_DTYPES

if HAS_TRITON:
    from . import triton_intweight, triton_lowrank


def _plain_grouped_up(t: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
    parts = t.split([w.shape[1] for w in weights], dim=-1)
    outs = [F.linear(p, w, biases[i] if biases else None) for i, (p, w) in enumerate(zip(parts, weights))]
    return torch.cat(outs, dim=-1)


@torch.library.custom_op("odllm::lowrank_down", mutates_args=())
def lowrank_down(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x[M, K] @ w[N, K]^T`` (split-K Triton kernel on CUDA)."""
    if HAS_TRITON and x.is_cuda:
        return triton_lowrank.down(x.contiguous(), w.contiguous())
    return F.linear(x, w)


@lowrank_down.register_fake
def _lowrank_down_fake(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.custom_op("odllm::grouped_up", mutates_args=())
def grouped_up(t: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
    """Concatenated ``up`` products of up to 3 projections sharing one input (one Triton launch on CUDA)."""
    if HAS_TRITON and t.is_cuda:
        return triton_lowrank.grouped_up(t.contiguous(), [w.contiguous() for w in weights], [b.contiguous() for b in biases])
    return _plain_grouped_up(t, weights, biases)


@grouped_up.register_fake
def _grouped_up_fake(t: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
    return t.new_empty((t.shape[0], sum(w.shape[0] for w in weights)))


@torch.library.custom_op("odllm::int_weight_mm", mutates_args=())
def int_weight_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                  group_size: int) -> torch.Tensor:
    """``x[M, K] @ W^T`` for integer codes in the checkpoint's layout (``group_size`` 0: int8 per channel).

    Triton on CUDA; elsewhere the dequantized product, the reference the kernel is tested against.
    """
    if HAS_TRITON and x.is_cuda and x.dtype in KERNEL_DTYPES:
        with torch.cuda.device(x.device):  # Triton launches on the current device: models split over GPUs
            return triton_intweight.int_weight(x.contiguous(), qweight.contiguous(), scales.contiguous(),
                                               None if zeros is None else zeros.contiguous(), bits, group_size or None)
    from ..quantization.kernels import dequantize_storage  # lazy: the quantization package imports this one

    weight = dequantize_storage(qweight, scales, zeros, bits, group_size or None, torch.float32)
    return F.linear(x.float(), weight).to(x.dtype)


@int_weight_mm.register_fake
def _int_weight_mm_fake(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                        bits: int, group_size: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], qweight.shape[0]))
