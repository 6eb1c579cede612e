"""Shared pieces of the benchmark scripts: model builders, timers, and table/JSON output."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from optimum_odllm.lowrank import LowRankLinear, replace_with_lowrank_linear  # noqa: E402
from optimum_odllm.ranks import ModuleShape, allocate_ranks  # noqa: E402

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)


def llama_model(layers: int, dtype: torch.dtype, device: str, seed: int = 0, **shape: Any) -> nn.Module:
    """A Llama-shaped causal LM with random N(0, 0.02) weights (timing does not depend on the values)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, **{**LLAMA_7B, **shape})
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def decoder_linear_shapes(model: nn.Module) -> list[ModuleShape]:
    return [
        ModuleShape(name, module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in name
    ]


def lowrank_like(model: nn.Module, ratio: float, rank_multiple: int = 128, seed: int = 1) -> dict[str, int]:
    """Swap the decoder Linears of ``model`` (in place) for random low-rank factors at ``ratio``.

    For speed measurements only: the shapes are exactly those OD-LLM produces at this ratio.
    """
    ranks = {k: v for k, v in allocate_ranks(decoder_linear_shapes(model), ratio, rank_multiple).items() if v}
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    replace_with_lowrank_linear(model, ranks)
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            module.to(device=device, dtype=dtype)
            for p in module.parameters():
                nn.init.normal_(p, std=0.02)
    return ranks


def integer_weights(model: nn.Module, bits: int, group_size: int = 128) -> nn.Module:
    """``model`` with integer weights for timing (round to nearest; timing does not depend on values), in place.

    Every ``LowRankLinear`` of the decoder becomes a ``QuantizedLowRankLinear`` (OD-LLM + ``factor_bits``) and
    every other decoder ``nn.Linear`` a dense ``QuantizedFactor`` (the GPTQ W4/W8 stand-in: the same aten kernels).
    """
    from optimum_odllm.lowrank import set_submodule
    from optimum_odllm.quantization import QuantizedFactor, QuantizedLowRankLinear, quantize_weight

    for name, module in list(model.named_modules()):
        if ".layers." not in name or name.endswith((".up", ".down")):
            continue
        if isinstance(module, LowRankLinear):
            new = QuantizedLowRankLinear.from_lowrank(module.float(), None, bits, group_size, "rtn")
        elif isinstance(module, nn.Linear):
            bias = None if module.bias is None else module.bias.detach()
            new = QuantizedFactor.from_quantized(quantize_weight(module.weight.detach().float(), None, bits, group_size,
                                                                 "rtn"), bias)
        else:
            continue
        set_submodule(model, name, new)
    return model


def add_model_args(parser) -> None:
    """The Llama-shape options shared by the benchmark scripts (7B shape by default)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU by default")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA); default = --heads")
    parser.add_argument("--attention-bias", action="store_true", help="q/k/v/o biases (Qwen2-style)")
    parser.add_argument("--tie-embeddings", action="store_true", help="lm_head shares the embedding matrix")


def model_shape(args) -> dict[str, Any]:
    """The LlamaConfig overrides that ``add_model_args`` options describe."""
    return dict(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads, vocab_size=args.vocab,
        attention_bias=args.attention_bias, tie_word_embeddings=args.tie_embeddings,
    )


def raise_recompile_limit(limit: int = 64) -> None:
    """Let dynamo keep ``limit`` compiled versions per function: several variants of one architecture, compiled in
    one process, then stay compiled side by side instead of falling back to eager (``cache_size_limit`` on older
    torch)."""
    for option in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, option):
            setattr(torch._dynamo.config, option, limit)


def median_time(fn: Callable[[], Any], warmup: int = 3, repeat: int = 10, cuda: bool | None = None) -> float:
    """Median wall seconds of ``fn`` (CUDA-synchronized when on GPU)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
            ).stdout.strip()
        except OSError:
            pass
    return info


def mean_se(values) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n)); needs at least two values."""
    return statistics.fmean(values), statistics.stdev(values) / len(values) ** 0.5


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
