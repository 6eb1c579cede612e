"""Portable int4 nibble packing and the integer-matmul dispatch per device (which kernel runs, and its layout).

The checkpoint holds one portable layout (int8 codes; int4 as two codes per byte, even column in the low
nibble) plus bfloat16 scales/zeros. Kernel layouts differ per device (aten's CPU and CUDA int4 packings are
not the same and not a plain nibble order), so they are built at load/first-use time by :func:`prepare` and
never stored. Which kernel is used is recorded in ``PreparedWeight.kernel``, so benchmarks can report it.

Measured on this project's 2-core CPU (``benchmarks/quantized_speed.py``, see ``docs/quantized_factors.md``):
``_weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu`` are about 2-4x faster than the bf16 dense GEMV
with bf16 activations but 7-30x slower with float32 activations, so float32 inputs are cast to bfloat16
around the kernel on CPU (still 1.5-2x faster than dense bf16, casts included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .gptq import QuantizedWeight, dequantize

CPU_INT4_GROUPS = (32, 64, 128, 256)
CPU_INT4_INNER_K_TILES = 2
CUDA_INT4_INNER_K_TILES = 8


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` codes 0..15 -> ``uint8 [out, in // 2]``, even column in the low nibble (portable layout)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of input columns, got {codes.shape[-1]}")
    if codes.dtype not in (torch.uint8, torch.int32, torch.int64, torch.int16):
        raise TypeError(f"int4 codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("int4 codes must lie in [0, 15]")
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``uint8 [out, in // 2]`` -> ``uint8 [out, in]``."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


def dequantize_storage(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                       group_size: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Float ``[out, in]`` weight of the stored layout (the reference every kernel path must reproduce)."""
    codes = qweight if bits == 8 else unpack_int4(qweight)
    return dequantize(QuantizedWeight(codes, scales, zeros, bits, group_size), dtype)


@dataclass(frozen=True)
class PreparedWeight:
    """A factor in the layout of the kernel chosen for one (device, compute dtype)."""

    kernel: str  # "aten_int8", "aten_int4_cpu", "aten_int4_cuda", "int8_dequantize_per_call" or "dequantized"
    compute_dtype: torch.dtype
    weight: torch.Tensor
    scales: torch.Tensor | None = None  # int8: [out]; int4: scale-and-zero [in // g, out, 2]
    group_size: int | None = None


def compute_dtype_for(x_dtype: torch.dtype, device: torch.device, bits: int) -> torch.dtype:
    """Activation dtype handed to the kernel: bf16 replaces float32 on CPU (measured 7-30x faster), and int4 on
    CUDA only takes bf16."""
    if device.type == "cpu" and x_dtype == torch.float32:
        return torch.bfloat16
    if device.type == "cuda" and bits == 4:
        return torch.bfloat16
    return x_dtype


def _int4_scale_zeros(scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.stack([scales.t(), zeros.t()], dim=-1).to(dtype).contiguous()


CPU_INT8_K_MULTIPLE = 16
#: aten._weight_int8pack_mm (torch 2.13, CPU) crashes on codes or activations that do not start on this boundary
#: once there are many rows (measured: codes 8 bytes off at 720 tokens, activations 2 or 8 bytes off at 2+ tokens);
#: safetensors' memory-mapped checkpoints hand tensors out at any offset. torch's allocator aligns to 64 bytes.
CPU_INT8_ALIGNMENT = 64


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and starting on a :data:`CPU_INT8_ALIGNMENT` boundary (a fresh copy where it is not)."""
    t = t.contiguous()
    return t if t.data_ptr() % CPU_INT8_ALIGNMENT == 0 else t.clone()


def _kernel_for(bits: int, out_features: int, in_features: int, group_size: int | None,
                device: torch.device) -> str:
    if device.type not in ("cpu", "cuda"):
        return "dequantized"
    if bits == 8:
        # CPU: aten's int8 kernel segfaults for in_features not a multiple of 16 with 2+ tokens (torch 2.13,
        # measured: K = 8, 12, 24, 40); such factors (tiny ranks) take the dequantized path.
        # CUDA: aten's int8 kernel ran 0.07x (1 token) to 0.009x (64 tokens) the speed of the bf16 product on an
        # H200 (benchmarks/README.md section 7): rescale the codes per call and use cuBLAS (few tokens take the
        # Triton kernel before this point, see QuantizedFactor.forward).
        if device.type == "cuda":
            return "int8_dequantize_per_call"
        return "aten_int8" if in_features % CPU_INT8_K_MULTIPLE == 0 else "dequantized"
    if device.type == "cpu" and group_size in CPU_INT4_GROUPS and out_features % 16 == 0:
        return "aten_int4_cpu"
    if (device.type == "cuda" and group_size in CPU_INT4_GROUPS and out_features % 8 == 0
            and in_features % (CUDA_INT4_INNER_K_TILES * 16) == 0):
        return "aten_int4_cuda"
    return "dequantized"


def triton_preferred_on_cuda(bits: int, out_features: int, in_features: int, group_size: int | None) -> bool:
    """Whether a factor runs the Triton kernel of ``optimum_odllm.kernels`` at few tokens on CUDA.

    int8: always (aten's kernel is the slow one above). int4: only where aten's tinygemm cannot take the shape:
    on the Llama-7B layer at 1 token tinygemm ran 1.72x the bf16 speed, the Triton kernel 0.83x (H200, 2026-12-02).
    """
    if bits == 8:
        return True
    return (group_size or 0) % 32 == 0 and _kernel_for(4, out_features, in_features, group_size,
                                                       torch.device("cuda")) == "dequantized"


def prepare(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
            group_size: int | None, in_features: int, compute_dtype: torch.dtype) -> PreparedWeight:
    """Build the kernel layout of a stored factor on ``qweight.device`` (dequantized fallback elsewhere)."""
    device = qweight.device
    out_features = qweight.shape[0]
    kernel = _kernel_for(bits, out_features, in_features, group_size, device)
    if kernel == "aten_int8":
        return PreparedWeight(kernel, compute_dtype, _aligned(qweight), _aligned(scales.to(compute_dtype)))
    if kernel == "int8_dequantize_per_call":
        return PreparedWeight(kernel, compute_dtype, qweight.contiguous(), scales.to(compute_dtype).contiguous())
    if kernel == "aten_int4_cpu":
        codes = unpack_int4(qweight).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, CPU_INT4_INNER_K_TILES)
        return PreparedWeight(kernel, compute_dtype, packed, _int4_scale_zeros(scales, zeros, compute_dtype), group_size)
    if kernel == "aten_int4_cuda":
        codes = unpack_int4(qweight)
        high_first = ((codes[:, 0::2] << 4) | codes[:, 1::2]).contiguous()  # CUDA packing wants even column high
        packed = torch.ops.aten._convert_weight_to_int4pack(high_first, CUDA_INT4_INNER_K_TILES)
        return PreparedWeight(kernel, compute_dtype, packed, _int4_scale_zeros(scales, zeros, compute_dtype), group_size)
    return dequantized_layout(qweight, scales, zeros, bits, group_size, compute_dtype)


def dequantized_layout(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                       group_size: int | None, compute_dtype: torch.dtype) -> PreparedWeight:
    """The portable fallback: the float weight the codes stand for, multiplied by ``F.linear``."""
    weight = dequantize_storage(qweight, scales, zeros, bits, group_size, torch.float32).to(compute_dtype)
    return PreparedWeight("dequantized", compute_dtype, weight)


def matmul(x2d: torch.Tensor, prepared: PreparedWeight) -> torch.Tensor:
    """``x2d [tokens, in] @ W^T`` with the prepared kernel; ``x2d`` must already be in ``compute_dtype``."""
    if prepared.kernel == "aten_int8":
        # In a graph the pointer is unknown at trace time (a graph input may be a misaligned view): copy always.
        x2d = x2d.clone(memory_format=torch.contiguous_format) if torch.compiler.is_compiling() else _aligned(x2d)
        return torch.ops.aten._weight_int8pack_mm(x2d, prepared.weight, prepared.scales)
    if prepared.kernel == "int8_dequantize_per_call":  # int8 codes are exact in bf16/fp16; one rounding by the scale
        return F.linear(x2d, prepared.weight.to(x2d.dtype) * prepared.scales[:, None])
    if prepared.kernel == "aten_int4_cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, prepared.weight, prepared.group_size, prepared.scales)
    if prepared.kernel == "aten_int4_cuda":
        return torch.ops.aten._weight_int4pack_mm(x2d, prepared.weight, prepared.group_size, prepared.scales)
    return F.linear(x2d, prepared.weight)
