"""GPU kernels for low-rank projections at small token counts, and the rule that picks them.

:func:`use_kernels` is the whole dispatch policy: the ``torch.ops.odllm`` custom ops (Triton kernels,
or cuBLAS where it measured faster for the shape) for at most :data:`MAX_KERNEL_TOKENS` tokens on CUDA,
in inference, inside ``torch.compile`` or a CUDA-graph capture; plain ``F.linear`` everywhere else.
Eager mode stays on ``F.linear`` because it is bound by per-launch CPU cost, and a Triton launch
through a custom op costs more CPU time than a cuBLAS call (measured: H100 eager decode at batch 1
went from 35 to 87 ms per token with the kernels on). ``ODLLM_KERNELS=0`` turns the kernels off;
``ODLLM_KERNEL_MAX_TOKENS`` moves the token limit. It is 1 by default (decode at batch 1, the on-device
case): on the H200 (benchmarks/README.md, 2026-12-02) the kernels made compiled batch-1 decode of the
Llama-7B shape 1.13x faster than dense where cuBLAS factors gave 0.85-0.91x, but compiled batch-32 decode
(32 tokens) 0.70x where cuBLAS factors gave 0.99x, although each kernel alone beat cuBLAS at 32 tokens in
``benchmarks/kernels_roofline.py``. Those variants were timed one after the other, which biases by order
(benchmarks/README.md 4f). Round-robin (4g): batch 1 1.23x with the kernels vs 1.16x with cuBLAS and batched
``up`` products (1.16x vs 1.17x in an earlier call); with the limit at 32 tokens, batch 8 1.28x vs 1.26x and
batch 32 1.18x vs 1.20x: a tie, so the limit stays at 1 token. Two later calls on other machines (4h) had the
kernels behind cuBLAS at batch 1 (0.99x vs 1.17x, 0.91x vs 1.06x dense): ahead once, tied once, behind twice
over four calls. Time both on your machine; ``ODLLM_KERNEL_MAX_TOKENS=0`` turns the low-rank kernels off.

:func:`use_int_kernel` is the rule for integer factors (``optimum_odllm.quantization``): the
``int_weight_mm`` op for at most :data:`MAX_INT_KERNEL_TOKENS` tokens on CUDA (``ODLLM_INT_KERNEL_MAX_TOKENS``),
eager mode included, because the aten int8 kernel it replaces was far slower than one Triton launch.
"""

from __future__ import annotations

import os

import torch

from .capabilities import HAS_TRITON, KERNEL_DTYPES, MAX_GROUPS, MAX_INT_KERNEL_ROWS
from .ops import grouped_up, int_weight_mm, lowrank_down  # registers torch.ops.odllm.*

MAX_KERNEL_TOKENS = int(os.environ.get("ODLLM_KERNEL_MAX_TOKENS", "1"))
#: Integer factors take the Triton kernel up to this many tokens on CUDA, eager included: aten's CUDA int8
#: kernel is slower than the bf16 product it replaces even at one token (see triton_intweight).
MAX_INT_KERNEL_TOKENS = int(os.environ.get("ODLLM_INT_KERNEL_MAX_TOKENS", "16"))
ENABLED = os.environ.get("ODLLM_KERNELS", "1") != "0"


def _small_cuda_inference(x: torch.Tensor, tokens: int, limit: int) -> bool:
    return (
        ENABLED
        and HAS_TRITON
        and x.is_cuda
        and x.dtype in KERNEL_DTYPES
        and tokens <= limit
        and not torch.is_grad_enabled()
    )


def use_kernels(x: torch.Tensor, tokens: int) -> bool:
    """Whether the Triton path applies to ``tokens`` rows of ``x`` (CUDA, 16-bit, inference, few tokens)."""
    return _small_cuda_inference(x, tokens, MAX_KERNEL_TOKENS) and (
        torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()
    )


def use_int_kernel(x: torch.Tensor, tokens: int) -> bool:
    """Whether integer factors take the Triton kernel for ``tokens`` rows of ``x`` (CUDA, 16-bit, inference).

    The environment's limit is capped at :data:`MAX_INT_KERNEL_ROWS` (one tile holds every row)."""
    return _small_cuda_inference(x, tokens, min(MAX_INT_KERNEL_TOKENS, MAX_INT_KERNEL_ROWS))


__all__ = ["HAS_TRITON", "MAX_GROUPS", "MAX_INT_KERNEL_TOKENS", "MAX_KERNEL_TOKENS", "grouped_up", "int_weight_mm",
           "lowrank_down", "use_int_kernel", "use_kernels"]
