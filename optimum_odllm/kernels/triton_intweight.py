"""Triton kernel for weight-only integer factors (int8 per channel, int4 group-wise) at small token counts.

Why: aten's CUDA int8 weight-only kernel (``_weight_int8pack_mm``) ran 0.17-0.52x the speed of the bf16
GEMV it should beat on an H200 (``benchmarks/quantized_speed.py``, 2026-12-02), and a Llama-7B decode with
OD-LLM 0.5 + int8 factors took 64 ms per token against 7.3 ms dense. A decode-time product is memory-bound,
so reading one byte (int8) or half a byte (int4) per weight should beat two bytes if the kernel keeps the GPU
busy: this is the split-K GEMM of :mod:`.triton_lowrank` reading the checkpoint's portable layout directly
(no repacking), converting codes in registers and applying the scales:

* int8: ``y = (x @ q^T) * s`` (``q`` int8 ``[N, K]``, ``s`` ``[N]``);
* int4: ``w = (q - 8) * s + z`` per group of ``group_size`` input columns, two codes per byte (even column in
  the low nibble), so each tile multiplies the even and the odd input columns by the low and high nibbles.

Tiles never cross an int4 group (``BLOCK_K`` divides ``group_size``), so each tile reads one scale and one zero
per output row. Each shape is tuned once per process like the low-rank kernels (:func:`.triton_lowrank._pick`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .capabilities import MAX_INT_KERNEL_ROWS
from .triton_lowrank import _block_m, _pick, _sm_count, _splitk_reduce_kernel

@triton.jit
def _int_weight_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, stride_qn, stride_sn, k_per_split, group_size,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for kk in range(0, k_per_split, BLOCK_K):
        k0 = k_start + kk
        if BITS == 8:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0)
            q = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                        other=0)
            acc += tl.dot(x, tl.trans(q.to(x.dtype)))
        else:
            offs_j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte columns: input columns 2j (low) and 2j+1 (high)
            j_mask = offs_j < K // 2
            packed = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_j[None, :],
                             mask=n_mask[:, None] & j_mask[None, :], other=0)
            g_mask = n_mask & (k0 < K)
            group = k0 // group_size
            s = tl.load(s_ptr + offs_n * stride_sn + group, mask=g_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + offs_n * stride_sn + group, mask=g_mask, other=0.0).to(tl.float32)
            x_mask = m_mask[:, None] & j_mask[None, :]
            x_base = x_ptr + offs_m[:, None] * stride_xm + 2 * offs_j[None, :]
            x_even = tl.load(x_base, mask=x_mask, other=0.0)
            x_odd = tl.load(x_base + 1, mask=x_mask, other=0.0)
            # One group per tile, so with the tinygemm grid of quantization.gptq.group_grid(4), w = (q - 8) s + z:
            # sum_k x_k w_k = s * sum_k x_k q_k + (z - 8 s) * sum_k x_k. The codes go to the dot as they are
            # (0..15 are exact in 16 bits) and the scale and zero are applied once per tile, not per weight:
            # dequantizing every weight made the kernel ALU-bound.
            codes = tl.dot(x_even, tl.trans((packed & 0xF).to(x_even.dtype)))
            codes += tl.dot(x_odd, tl.trans((packed >> 4).to(x_odd.dtype)))
            x_sum = tl.sum(x_even.to(tl.float32), axis=1) + tl.sum(x_odd.to(tl.float32), axis=1)
            acc += codes * s[None, :] + x_sum[:, None] * (z - 8.0 * s)[None, :]
    if BITS == 8:
        acc = acc * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT == 1:
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # float32 partials [SPLIT, M, N], reduced in a fixed order by _splitk_reduce_kernel
        tl.store(out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)


def candidates(m: int, n: int, k: int, sms: int, bits: int, group_size: int | None) -> list[tuple[int, int, int]]:
    """(BLOCK_N, BLOCK_K, SPLIT) configs: split K until about two programs per SM first, then variations.

    int4 tiles must stay inside one group: ``BLOCK_K`` divides ``group_size`` (and is at least 32, two 16-wide
    halves for ``tl.dot``).
    """
    if bits == 4:
        block_ks = [b for b in (32, 64, 128, 256) if group_size % b == 0]
        if not block_ks:
            raise ValueError(f"int4 kernel needs a group size divisible by 32, got {group_size}")
    else:
        block_ks = [64, 128, 256]
    configs = []
    for block_k in sorted(block_ks, key=lambda b: abs(b - 128)):  # 128 first: the low-rank kernel's best
        for block_n in (32, 64):
            split = 1
            while triton.cdiv(n, block_n) * split < 2 * sms and triton.cdiv(k, block_k * split * 2) >= 2:
                split *= 2
            for sp in sorted({split, max(1, split // 2), split * 2}):
                if triton.cdiv(k, block_k * sp) >= 1 and (block_n, block_k, sp) not in configs:
                    configs.append((block_n, block_k, sp))
    return configs


def int_weight_with(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, bits: int,
                    group_size: int | None, config: tuple[int, int, int]) -> torch.Tensor:
    """``x @ W^T`` for the stored codes ``q`` (``W`` as :func:`~optimum_odllm.quantization.dequantize` defines it)."""
    block_n, block_k, split = config
    m, k = x.shape
    n = q.shape[0]
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    target = out if split == 1 else torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(n, block_n), split)
    _int_weight_kernel[grid](
        x, q, s, s if z is None else z, target, m, n, k, x.stride(0), q.stride(0), s.stride(0) if bits == 4 else 0,
        k_per_split, group_size or k, BITS=bits, BLOCK_M=_block_m(m), BLOCK_N=block_n, BLOCK_K=block_k,
        SPLIT=split, num_warps=4,
    )
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](target, out, m * n, SPLIT=split, BLOCK=block)
    return out


def int_weight(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, bits: int,
               group_size: int | None) -> torch.Tensor:
    """``x[M, K] @ W^T`` for small ``M`` with the fastest measured config for this shape."""
    m, k = x.shape
    if m > MAX_INT_KERNEL_ROWS:
        raise ValueError(f"the integer kernel takes at most {MAX_INT_KERNEL_ROWS} rows, got {m}")
    n = q.shape[0]
    key = ("int", bits, group_size, triton.next_power_of_2(m), n, k, x.dtype, x.device.index)
    config = _pick(key, candidates(m, n, k, _sm_count(x.device), bits, group_size),
                   lambda c: int_weight_with(x, q, s, z, bits, group_size, c))
    return int_weight_with(x, q, s, z, bits, group_size, config)
