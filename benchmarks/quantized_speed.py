"""Decode speed of quantized low-rank factors against bf16 dense and dense int8/int4, side by side in one run.

Variants (same kernels for the dense and low-rank quantized cases, so the comparison isolates the shapes):

* ``dense_bf16``: ``nn.Linear`` in bfloat16 (the baseline; every ratio is ``dense_bf16 time / variant time``);
* ``lowrank_bf16``: ``LowRankLinear`` at ``--ratio`` with the ranks OD-LLM allocates (multiples of 128);
* ``lowrank_int8`` / ``lowrank_int4``: ``QuantizedLowRankLinear`` (int8 per channel / int4 g128);
* ``dense_int8`` / ``dense_int4``: one ``QuantizedFactor`` per projection: the weight-only quantized dense
  model run by the same aten kernels (the stand-in for GPTQ W4 / W8 models where no GPTQ kernel runs).

Sections: ``kernels`` (the evidence for the fp32->bf16 activation cast: int8/int4 kernels with fp32 vs bf16
activations, one GEMV each), ``layer`` (one decoder layer's seven projections, batch 1, one token) and
``model`` (full ``transformers`` decode step with a KV cache, modules swapped; random weights, tied bf16
``lm_head`` left dense in every variant). Timings are interleaved round by round, median over rounds.

CPU (what the issue's CPU goal is about)::

    python benchmarks/quantized_speed.py --device cpu --shapes qwen2.5-0.5b,llama-3.2-1b \
        --model-shapes qwen2.5-0.5b --threads 1 --out benchmarks/results/quantized_speed_cpu.json

GPU (not run by the author: H100, Llama-7B layer, batch 1/16/64, every variant captured in a CUDA graph)::

    python benchmarks/quantized_speed.py --device cuda --shapes llama-7b --model-shapes none --tokens 1,16,64 \
        --cuda-graphs --out benchmarks/results/quantized_speed_gpu_h100.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from common import ROOT, machine_info, markdown_table, write_json  # also puts the repository on sys.path

from optimum_odllm.lowrank import LowRankLinear, set_submodule  # noqa: E402
from optimum_odllm.quantization import QuantizedFactor, QuantizedLowRankLinear, quantize_weight  # noqa: E402
from optimum_odllm.ranks import ModuleShape, allocate_ranks  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(arch="qwen2", hidden=896, inter=4864, layers=24, heads=14, kv_heads=2, vocab=151936),
    "llama-3.2-1b": dict(arch="llama", hidden=2048, inter=8192, layers=16, heads=32, kv_heads=8, vocab=128256),
    "llama-7b": dict(arch="llama", hidden=4096, inter=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
}
VARIANTS = ("dense_bf16", "lowrank_bf16", "lowrank_int8", "lowrank_int4", "dense_int8", "dense_int4")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUP_SIZE = 128
HEAD8 = "+head_int8"
MODEL_VARIANTS = (*VARIANTS, "lowrank_int8" + HEAD8)  # what a quantized lm_head would add (not OD-LLM's scope)


def layer_shapes(shape: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """``{projection: (in, out)}`` of one decoder layer."""
    h, head_dim = shape["hidden"], shape["hidden"] // shape["heads"]
    q, kv = shape["heads"] * head_dim, shape["kv_heads"] * head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, shape["inter"]), "up_proj": (h, shape["inter"]), "down_proj": (shape["inter"], h)}


def layer_ranks(shape: dict[str, Any], ratio: float) -> dict[str, int | None]:
    """OD-LLM's rank allocation for one layer (``None``: kept dense, e.g. thin k/v projections)."""
    shapes = [ModuleShape(name, i, o) for name, (i, o) in layer_shapes(shape).items()]
    return allocate_ranks(shapes, ratio, 128)


def random_lowrank(in_features: int, out_features: int, rank: int, bias: bool, seed: int) -> LowRankLinear:
    torch.manual_seed(seed)
    module = LowRankLinear(in_features, out_features, rank, bias=bias)
    for p in module.parameters():
        nn.init.normal_(p, std=0.02)
    return module


def build_variant(variant: str, linear: nn.Linear, rank: int | None, seed: int) -> nn.Module:
    """The replacement of one float ``nn.Linear`` in ``variant`` (quantization by rounding: speed only)."""
    bias = linear.bias is not None
    if variant == "dense_bf16" or (variant == "lowrank_bf16" and rank is None):
        return copy.deepcopy(linear).to(torch.bfloat16)
    if variant == "lowrank_bf16":
        return random_lowrank(linear.in_features, linear.out_features, rank, bias, seed).to(torch.bfloat16)
    bits = 8 if variant.endswith("int8") else 4
    if variant.startswith("dense") or rank is None:  # a thin module kept dense is quantized dense
        q = quantize_weight(linear.weight.detach().float(), None, bits, GROUP_SIZE, "rtn")
        return QuantizedFactor.from_quantized(q, None if not bias else linear.bias.detach().to(torch.bfloat16))
    lowrank = random_lowrank(linear.in_features, linear.out_features, rank, bias, seed)
    module = QuantizedLowRankLinear.from_lowrank(lowrank, None, bits, GROUP_SIZE, "rtn")
    if bias:
        module.up.bias.data = module.up.bias.data.to(torch.bfloat16)
    return module


def kernels_used(module: nn.Module, device: torch.device, tokens: int) -> list[str]:
    """Kernels the factors of ``module`` run for ``tokens`` bf16 rows on ``device`` (Triton or the prepared one)."""
    from optimum_odllm import kernels as gpu_kernels

    probe = torch.empty(tokens, 1, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        return sorted({"triton_int" if gpu_kernels.use_int_kernel(probe, tokens) and m.triton_ready
                       else m.prepared(device, torch.bfloat16).kernel
                       for m in module.modules() if isinstance(m, QuantizedFactor)})


class Timer:
    """Interleaved timing: every round times each variant once, so background load hits all of them alike."""

    def __init__(self, device: torch.device, rounds: int):
        self.device, self.rounds = device, rounds

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def run(self, fns: dict[str, Callable[[], Any]], calls: int) -> dict[str, float]:
        for fn in fns.values():  # warm-up: kernel layouts are prepared on first use
            fn(), fn()
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(self.rounds):
            for name, fn in fns.items():
                self._sync()
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                self._sync()
                samples[name].append((time.perf_counter() - start) / calls)
        return {k: statistics.median(v) for k, v in samples.items()}


def maybe_graph(fn: Callable[[], Any], use_graph: bool) -> Callable[[], Any]:
    """Capture ``fn`` in a CUDA graph (launch overhead out of the picture, as a compiled decode step would)."""
    if not use_graph:
        return fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()

    def replay(keep_alive=fn) -> None:  # the graph reads tensors owned by fn's modules: they must outlive it
        graph.replay()

    return replay


def bench_kernels(device: torch.device, timer: Timer, calls: int) -> list[dict[str, Any]]:
    """Why float32 activations are cast to bf16: each kernel with fp32 vs bf16 activations vs bf16 dense."""
    rows = []
    for out_f, in_f in [(4864, 896), (896, 4864), (2048, 2048), (256, 896)]:
        w = torch.randn(out_f, in_f, device=device) * 0.02
        factors = {b: QuantizedFactor.from_quantized(quantize_weight(w, None, b, GROUP_SIZE, "rtn")) for b in (8, 4)}
        x32 = torch.randn(1, in_f, device=device)
        x16 = x32.to(torch.bfloat16)
        w16 = w.to(torch.bfloat16)
        prep = {(b, dt): factors[b].prepared(device, dt) for b in (8, 4) for dt in (torch.float32, torch.bfloat16)}
        raw8 = factors[8].qweight, factors[8].scales.float()
        fns = {
            "dense_bf16": lambda: torch.nn.functional.linear(x16, w16),
            "dense_fp32": lambda: torch.nn.functional.linear(x32, w),
            "int8_bf16": lambda: torch.ops.aten._weight_int8pack_mm(x16, prep[(8, torch.bfloat16)].weight,
                                                                   prep[(8, torch.bfloat16)].scales),
            "int8_fp32_native": lambda: torch.ops.aten._weight_int8pack_mm(x32, raw8[0], raw8[1]),
            "int8_fp32_cast": lambda: factors[8](x32),
            "int4_bf16": lambda: factors[4](x16),
        }
        if device.type == "cpu":
            sz = prep[(4, torch.bfloat16)].scales.float()
            packed = prep[(4, torch.bfloat16)].weight
            fns["int4_fp32_native"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x32, packed, GROUP_SIZE, sz)
        times = timer.run(fns, calls)
        row = {"shape": f"{out_f}x{in_f}"}
        row.update({f"{k} x": times["dense_bf16"] / v for k, v in times.items() if k != "dense_bf16"})
        rows.append(row)
    return rows


def bench_layer(name: str, shape: dict[str, Any], ratio: float, tokens: int, device: torch.device, timer: Timer,
                calls: int, graphs: bool) -> dict[str, Any]:
    """One decoder layer's seven projections, each fed a ``[tokens, in]`` bf16 activation."""
    ranks = layer_ranks(shape, ratio)
    torch.manual_seed(0)
    linears = {p: nn.Linear(i, o, bias=p in ("q_proj", "k_proj", "v_proj") and shape["arch"] == "qwen2")
               for p, (i, o) in layer_shapes(shape).items()}
    for lin in linears.values():
        nn.init.normal_(lin.weight, std=0.02)
    inputs = {p: torch.randn(tokens, i, device=device, dtype=torch.bfloat16) for p, (i, _) in layer_shapes(shape).items()}
    fns, kernels = {}, {}
    for v_idx, variant in enumerate(VARIANTS):
        mods = {p: build_variant(variant, lin, ranks[p], seed=v_idx * 10 + j).to(device)
                for j, (p, lin) in enumerate(linears.items())}
        kernels[variant] = sorted({k for m in mods.values() for k in kernels_used(m, device, tokens)})

        def step(mods=mods):
            with torch.inference_mode():
                return [mods[p](inputs[p]) for p in PROJECTIONS]

        step()  # prepare kernel layouts before any graph capture
        fns[variant] = maybe_graph(step, graphs)
    times = timer.run(fns, calls)
    return {"shape": name, "tokens": tokens, "ratio": ratio, "ranks": ranks, "kernels": kernels,
            "seconds": times, "speedup": {k: times["dense_bf16"] / v for k, v in times.items()}}


def build_model(shape: dict[str, Any], device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    head_dim = shape["hidden"] // shape["heads"]
    kwargs = dict(hidden_size=shape["hidden"], intermediate_size=shape["inter"], num_hidden_layers=shape["layers"],
                  num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
                  max_position_embeddings=4096, tie_word_embeddings=True, head_dim=head_dim)
    config = (Qwen2Config if shape["arch"] == "qwen2" else LlamaConfig)(**kwargs)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval()


def swap_model(base: nn.Module, variant: str, ranks_by_proj: dict[str, int | None]) -> nn.Module:
    """A copy of ``base`` sharing its embedding/lm_head, with every decoder projection replaced."""
    embed = base.get_input_embeddings().weight
    model = copy.deepcopy(base, memo={id(embed): embed}) if variant != "dense_bf16" else base
    if variant == "dense_bf16":
        return model
    layer_variant = variant.removesuffix(HEAD8)
    for i, (name, module) in enumerate(list(model.named_modules())):
        if isinstance(module, nn.Linear) and ".layers." in name:
            proj = name.rsplit(".", 1)[1]
            set_submodule(model, name, build_variant(layer_variant, module.float(), ranks_by_proj[proj], seed=i))
    if variant.endswith(HEAD8):  # lm_head as a dense int8 factor (OD-LLM itself never touches it)
        head = model.get_output_embeddings()
        model.lm_head = QuantizedFactor.from_quantized(quantize_weight(head.weight.detach().float(), None, 8, None, "rtn"))
    return model


def bytes_without(model: nn.Module, embed: torch.Tensor) -> int:
    """Bytes of every parameter and buffer except the shared embedding table."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if t is not embed)


def bytes_read_per_token(models: dict[str, nn.Module], embed: torch.Tensor) -> dict[str, int]:
    """Weight bytes one decode step reads: every weight once, the embedding table only where it is the tied head.

    The embedding itself is read one row per token; a tied ``lm_head`` reads all of it. At batch 1 on a memory-bound
    CPU, dense bytes / variant bytes is the speed-up the variant reaches when both stream weights at the same rate.
    """
    return {v: bytes_without(m, embed) + (embed.numel() * embed.element_size()
                                         if getattr(m.get_output_embeddings(), "weight", None) is embed else 0)
            for v, m in models.items()}


def bench_model(name: str, shape: dict[str, Any], ratio: float, device: torch.device, timer: Timer,
                prompt: int, steps: int) -> dict[str, Any]:
    """Per-token latency of a decode step (batch 1, KV cache after a ``prompt``-token prefill)."""
    ranks = layer_ranks(shape, ratio)
    base = build_model(shape, device)
    models = {v: swap_model(base, v, ranks) for v in MODEL_VARIANTS}
    gc.collect()
    prompt_ids = torch.randint(0, shape["vocab"], (1, prompt), device=device)
    next_ids = torch.randint(0, shape["vocab"], (1, 1), device=device)

    def decode(model):
        with torch.inference_mode():
            out = model(input_ids=prompt_ids, use_cache=True)
            cache = out.past_key_values
            start = time.perf_counter()
            for _ in range(steps):
                out = model(input_ids=next_ids, past_key_values=cache, use_cache=True)
            return (time.perf_counter() - start) / steps

    for model in models.values():
        decode(model)  # warm-up, prepares kernel layouts
    samples: dict[str, list[float]] = {v: [] for v in MODEL_VARIANTS}
    for _ in range(timer.rounds):
        for v, model in models.items():
            samples[v].append(decode(model))
    times = {v: statistics.median(s) for v, s in samples.items()}
    embed = base.get_input_embeddings().weight
    params = {v: bytes_without(m, embed) for v, m in models.items()}
    read = bytes_read_per_token(models, embed)
    return {"shape": name, "ratio": ratio, "prompt": prompt, "steps": steps, "seconds": times,
            "speedup": {v: times["dense_bf16"] / t for v, t in times.items()},
            "bytes_without_embedding": params, "bytes_read_per_token": read,
            "bytes_ratio": {v: read["dense_bf16"] / b for v, b in read.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", default="qwen2.5-0.5b,llama-3.2-1b", help="layer benchmark shapes")
    parser.add_argument("--model-shapes", default="qwen2.5-0.5b", help="full-model decode shapes, or 'none'")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--tokens", default="1", help="comma list of tokens per call for the layer benchmark")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per model timing")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/quantized_speed_<device>.json "
                        "in the repository, wherever the script is run from)")
    args = parser.parse_args()
    if args.out is None:
        args.out = str(ROOT / "benchmarks" / "results" / f"quantized_speed_{torch.device(args.device).type}.json")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    timer = Timer(device, args.rounds)
    result: dict[str, Any] = {"machine": machine_info(), "args": vars(args), "baseline": "dense_bf16",
                              "kernels": [], "layer": [], "model": []}
    if not args.skip_kernels:
        result["kernels"] = bench_kernels(device, timer, args.calls)
        cols = ["shape"] + [k for k in result["kernels"][0] if k != "shape"]
        print("## kernels (speedup over bf16 dense GEMV, 1 token)\n" + markdown_table(result["kernels"], cols) + "\n")
    for name in args.shapes.split(","):
        for tokens in (int(t) for t in args.tokens.split(",")):
            result["layer"].append(bench_layer(name, SHAPES[name], args.ratio, tokens, device, timer, args.calls,
                                               args.cuda_graphs))
            write_json(args.out, result)
    rows = [{"shape": r["shape"], "tokens": r["tokens"], **{v: r["speedup"][v] for v in VARIANTS}} for r in result["layer"]]
    print("## one decoder layer, seven projections (speedup over dense_bf16)\n"
          + markdown_table(rows, ["shape", "tokens", *VARIANTS]) + "\n")
    for name in [] if args.model_shapes == "none" else args.model_shapes.split(","):
        result["model"].append(bench_model(name, SHAPES[name], args.ratio, device, timer, args.prompt, args.steps))
        write_json(args.out, result)
        gc.collect()
    if result["model"]:
        rows = [{"shape": r["shape"], **r["speedup"]} for r in result["model"]]
        print("## full model decode step, batch 1 (speedup over dense_bf16)\n"
              + markdown_table(rows, ["shape", *MODEL_VARIANTS]))
        rows = [{"shape": r["shape"], **{v: b / r["bytes_without_embedding"]["dense_bf16"]
                                          for v, b in r["bytes_without_embedding"].items()}} for r in result["model"]]
        print("\n## bytes stored besides the shared bf16 embedding, fraction of dense_bf16 (the head8 variant adds its "
              "int8 lm_head)\n" + markdown_table(rows, ["shape", *MODEL_VARIANTS]))
        rows = [{"shape": r["shape"], **r["bytes_ratio"]} for r in result["model"]]
        print("\n## weight bytes a decode step reads, dense_bf16 / variant (the ceiling of a memory-bound step)\n"
              + markdown_table(rows, ["shape", *MODEL_VARIANTS]))
    write_json(args.out, result)
    print(f"\nwrote {args.out}  ({result['machine']['date']}, {result['machine']['cpu']}, threads={args.threads})")


if __name__ == "__main__":
    main()
