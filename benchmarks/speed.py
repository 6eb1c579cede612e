"""Inference speed of an OD-LLM low-rank model against the dense model, measured side by side.

Builds a Llama-shaped model (7B shape by default; random weights, since timing does not depend on
values), and its low-rank twin with exactly the ranks OD-LLM allocates at ``--ratio``. Measures:

* ``micro``: one decoder layer's seven projections (dense GEMMs vs two low-rank GEMMs each);
* ``prefill``: full forward over a prompt, per batch size and length;
* ``decode``: per-token latency through ``generate`` (eager with a dynamic cache, and, on CUDA,
  the static-cache + ``torch.compile`` path that captures CUDA graphs), at batch 1 and 32;
* every timing for the variants of ``--variants``: ``dense``; ``lowrank`` (two GEMMs per projection,
  cuBLAS); ``fused`` (:func:`optimum_odllm.fused.fuse_shared_inputs`: one ``down`` GEMM for q/k/v and
  gate/up, and one batched ``up`` product for each run of equal-shaped siblings, cuBLAS); ``fused_down``
  (the shared ``down`` GEMM only, one ``up`` GEMM per projection: the fusion before 2026-12-03);
  ``fused_eager`` (fused with ``batch_ups="always"``: the batched ``up`` products in eager mode too);
  ``kernels`` (fused, plus the Triton kernels of :mod:`optimum_odllm.kernels` at
  small token counts: CUDA only, and only timed on the compiled decode path, the one place they run);
  ``int8`` / ``int4`` (the low-rank factors as integer codes: OD-LLM + ``factor_bits``, aten kernels) and
  ``dense_int4`` / ``dense_int8`` (the dense weights as integer codes with the same kernels: the GPTQ W4/W8 stand-in);
  on CUDA the integer variants take the library's default kernels (Triton at few tokens for int8), ``<variant>_aten``
  never the Triton kernel (aten's tinygemm for int4, per-call dequantization + cuBLAS for int8);
* peak memory of each model, and (``--profile-compiled``) the top GPU kernels of one compiled ``generate`` and its
  host-side stages (guard check, compiled region, graph launch, waiting for the GPU, eager ops).

Prints a markdown table and writes JSON. Example (GPU)::

    python benchmarks/speed.py --device cuda --layers 32 --out benchmarks/results/speed_gpu.json

and on this 2-core CPU (a smaller Llama)::

    python benchmarks/speed.py --device cpu --layers 4 --hidden 1024 --intermediate 2816 --heads 16 --vocab 8000 \
        --prefill 1x128,8x128 --decode-batches 1,8 --decode-tokens 16 --no-compile --out benchmarks/results/speed_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from common import (
    add_model_args,
    model_shape,
    decoder_linear_shapes,
    integer_weights,
    llama_model,
    lowrank_like,
    machine_info,
    markdown_table,
    median_time,
    raise_recompile_limit,
    write_json,
)
from optimum_odllm import kernels
from optimum_odllm.fused import fuse_shared_inputs


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--rank-multiple", type=int, default=128)
    p.add_argument("--micro-tokens", default="1,64,512,4096", help="token counts for the per-layer GEMM micro-benchmark")
    p.add_argument("--prefill", default="1x128,1x512,1x2048,32x128", help="BATCHxLEN prompts for prefill timing")
    p.add_argument("--decode-batches", default="1,32")
    p.add_argument("--decode-prompt", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--no-compile", action="store_true", help="skip the static-cache + torch.compile decode path")
    p.add_argument("--no-eager-decode", action="store_true", help="only the compiled decode path (split long GPU runs)")
    p.add_argument("--profile", action="store_true", help="profile compiled generate's GPU kernels per variant (CUDA)")
    p.add_argument("--profile-compiled", action="store_true",
                   help="after each compiled decode timing (after all rounds with --rounds), profile one more "
                        "(already compiled) generate call: GPU kernels and host stages (CUDA)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--rounds", type=int, default=0,
                   help="prefill and decode: time the variants round-robin for this many rounds (order reversed "
                        "every other round) and report medians, instead of one variant after the other (the "
                        "first-timed variant measured up to 2x slower on the H200); 0 keeps the sequential timing")
    p.add_argument("--variants", default="dense,lowrank,fused,kernels",
                   help="kernels is CUDA only; fused_down: shared down GEMM only; fused_eager: batched up products eagerly too; also int8, int4, dense_int8, dense_int4 (+ '_aten': never the "
                        "Triton kernel on CUDA)")
    p.add_argument("--out", default="benchmarks/results/speed.json")
    return p.parse_args()


@torch.no_grad()
def micro_layer(dense_layer: torch.nn.Module, lowrank_layer: torch.nn.Module, tokens: int, device: str, dtype: torch.dtype, repeat: int) -> dict[str, Any]:
    """Time the 7 projections of one layer; check the low-rank result against an fp64 reference."""
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    d_mods = [dense_layer.get_submodule(n) for n in names]
    l_mods = [lowrank_layer.get_submodule(n) for n in names]
    inputs = [torch.randn(tokens, m.in_features, device=device, dtype=dtype) for m in d_mods]
    # correctness of the low-rank forward (bf16 operands: relative error ~1e-3..1e-2)
    m, x = l_mods[0], inputs[0]
    ref = x.double() @ (m.up.weight.double() @ m.down.weight.double()).T
    if m.up.bias is not None:
        ref = ref + m.up.bias.double()
    rel = float((m(x).double() - ref).norm() / ref.norm())
    assert rel < 2e-2, f"low-rank forward is wrong (relative error {rel})"
    t_dense = median_time(lambda: [mod(x) for mod, x in zip(d_mods, inputs)], repeat=repeat)
    t_low = median_time(lambda: [mod(x) for mod, x in zip(l_mods, inputs)], repeat=repeat)
    return {"tokens": tokens, "dense_ms": 1e3 * t_dense, "lowrank_ms": 1e3 * t_low, "speedup": t_dense / t_low, "rel_error": rel}


@torch.no_grad()
def prefill(model: torch.nn.Module, batch: int, length: int, vocab: int, device: str, repeat: int) -> float:
    ids = torch.randint(3, vocab, (batch, length), device=device)
    return median_time(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), repeat=repeat)


@torch.no_grad()
def generate_kwargs(compiled: bool) -> dict[str, Any]:
    """Greedy ``generate`` for exactly the asked tokens; static cache (compiled by transformers) or eager."""
    kwargs: dict[str, Any] = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    if compiled:
        kwargs["cache_implementation"] = "static"
    else:
        kwargs["disable_compile"] = True
    return kwargs


def decode_latency(
    model: torch.nn.Module, batch: int, prompt: int, tokens: int, vocab: int, device: str, compiled: bool, repeat: int
) -> tuple[float, float]:
    """Seconds per generated token, (time for N tokens - time for 1 token) / (N - 1), and the first call's seconds.

    The first call of the compiled path includes ``torch.compile`` and CUDA-graph recording (what a user waits
    for once per shape).
    """
    ids = torch.randint(3, vocab, (batch, prompt), device=device)
    kwargs = generate_kwargs(compiled)

    def run(n: int):
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)

    reps = max(3, repeat // 2)
    first = median_time(lambda: run(tokens), warmup=0, repeat=1)
    t_n = median_time(lambda: run(tokens), warmup=1, repeat=reps)
    t_1 = median_time(lambda: run(1), warmup=1, repeat=reps)
    return (t_n - t_1) / (tokens - 1), first


def round_robin(variants: list, rounds: int, timing) -> dict[str, list[float]]:
    """``timing(model)`` seconds of every ``(label, model, kernels_on)``, ``rounds`` times, every other round reversed."""
    per: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    for r in range(rounds):
        for label, model, on in (variants if r % 2 == 0 else variants[::-1]):
            with kernels_enabled(on):
                per[label].append(timing(model))
    return per


def interleaved_prefill(variants: list, batch: int, length: int, args: argparse.Namespace, device: str) -> dict:
    """Prefill milliseconds of every variant round-robin (``--rounds``; each timing a median of ``--repeat`` calls)."""
    timed = [v for v in variants if v[0] != "kernels"]  # eager: the kernels apply only in graphs, so it is ``fused``
    per = round_robin(timed, args.rounds, lambda model: prefill(model, batch, length, args.vocab, device, args.repeat))
    row: dict[str, Any] = {"mode": "interleaved"}
    for label, times in per.items():
        row[f"{label}_ms"] = 1e3 * statistics.median(times)
        row[f"{label}_ms_rounds"] = [1e3 * t for t in times]
    return row


def interleaved_decode(variants: list, batch: int, args: argparse.Namespace, device: str, compiled: bool) -> dict:
    """Per-token decode time of every variant, round-robin: ``--rounds`` rounds, each timing one ``tokens``-token and
    one 1-token ``generate`` per variant, every other round in reverse order; medians over rounds (all in the row).

    Compiled variants stay compiled side by side (one dynamo cache entry per model and shape), so nothing is reset.
    """
    ids = torch.randint(3, args.vocab, (batch, args.decode_prompt), device=device)
    kwargs = generate_kwargs(compiled)
    timed = [(label, model, on) for label, model, on in variants if compiled or label != "kernels"]
    row: dict[str, Any] = {"batch": batch, "mode": ("static+compile" if compiled else "eager") + ", interleaved"}

    def run(model, n: int) -> float:
        return median_time(lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs), warmup=0, repeat=1)

    for label, model, on in timed:  # first calls (compile + CUDA-graph recording), then one warm call
        with kernels_enabled(on):
            row[f"{label}_first_call_s"] = run(model, args.decode_tokens)
            run(model, 1)
    per = round_robin(timed, args.rounds, lambda model: (run(model, args.decode_tokens) - run(model, 1)) / (args.decode_tokens - 1))
    for label in per:
        row[f"{label}_ms_per_token"] = 1e3 * statistics.median(per[label])
        row[f"{label}_ms_per_token_rounds"] = [1e3 * t for t in per[label]]
    return row


@torch.no_grad()
def profile_decode(
    model: torch.nn.Module, batch: int, prompt: int, tokens: int, vocab: int, device: str, top: int = 12, warm: int = 2
) -> dict[str, Any]:
    """Where a compiled (static cache) ``generate`` spends GPU time: the top kernels of ``tokens`` steps."""
    ids = torch.randint(3, vocab, (batch, prompt), device=device)
    kwargs = generate_kwargs(compiled=True)
    for _ in range(warm):  # compile, record the CUDA graphs
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    averages = prof.key_averages()
    events = [e for e in averages if getattr(e, "device_time_total", 0) > 0 and e.device_type.name == "CUDA"]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    gpu_us = sum(e.device_time_total for e in events)
    return {
        "batch": batch, "tokens": tokens, "wall_ms": 1e3 * wall, "gpu_kernel_ms": gpu_us / 1e3,
        "top": [{"name": e.key[:90], "calls": e.count, "ms": e.device_time_total / 1e3} for e in events[:top]],
        "host": host_stages(averages),
    }


# CPU-side stages of compiled decode steps, as the profiler names them: dynamo's guard check, the compiled region
# (AOT wrappers, CUDA-graph tree, launch), the graph launch itself, the host waiting for the GPU, and aten ops.
# The stages nest (the compiled region contains the launch), so they do not add up to the wall time.
HOST_STAGES = ("TorchDynamo Cache Lookup", "Torch-Compiled Region", "Pregraph bytecode", "AOTDispatcher",
               "CompiledFunction", "## Call CompiledFxGraph", "cudaGraphLaunch", "cudaStreamSynchronize",
               "cudaMemcpyAsync", "aten::")


def host_stages(averages) -> dict[str, dict[str, float]]:
    """Host milliseconds (inclusive CPU time) and calls per profiler event family of ``HOST_STAGES``.

    ``aten::`` sums the self time of every aten op the profiler saw, inside the compiled region (e.g. input copies)
    and outside it (``generate``'s own per-step work)."""
    stages: dict[str, dict[str, float]] = {}
    for event in averages:
        if event.device_type.name != "CPU":
            continue
        for stage in HOST_STAGES:
            if event.key.startswith(stage):
                entry = stages.setdefault(stage, {"ms": 0.0, "calls": 0})
                entry["ms"] += (event.self_cpu_time_total if stage == "aten::" else event.cpu_time_total) / 1e3
                entry["calls"] += event.count
                break
    return stages


@torch.no_grad()
def python_hotspots(model: torch.nn.Module, batch: int, prompt: int, tokens: int, vocab: int, device: str,
                    top: int = 20) -> list[dict[str, Any]]:
    """The Python functions with the most own time in one compiled ``generate`` (cProfile): which host code a
    variant adds per step (dynamo's prologue, AOT wrappers, CUDA-graph tree bookkeeping, ``generate`` itself)."""
    import cProfile
    import pstats

    ids = torch.randint(3, vocab, (batch, prompt), device=device)
    kwargs = generate_kwargs(compiled=True)
    profiler = cProfile.Profile()
    profiler.enable()
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (primitive calls, calls, own s, cumulative s, callers)}
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [{"function": f"{Path(file).name}:{line}:{name}", "calls": calls, "own_ms": 1e3 * own, "cum_ms": 1e3 * cum}
            for (file, line, name), (_, calls, own, cum, _) in rows]


def profile_after_timing(results: dict[str, Any], model: torch.nn.Module, on: bool, label: str, batch: int, args: argparse.Namespace) -> None:
    """Profile one more compiled ``generate`` (same shapes: no recompile) into ``results["profile"]``, then the
    Python hotspots of another; never raises."""
    with kernels_enabled(on):
        try:
            prof = profile_decode(model, batch, args.decode_prompt, args.decode_tokens, args.vocab, args.device, top=15, warm=0)
        except Exception as err:  # a profiler failure must not cost the timings
            prof = {"batch": batch, "error": f"{type(err).__name__}: {str(err)[:300]}"}
        try:
            prof["python_top"] = python_hotspots(model, batch, args.decode_prompt, args.decode_tokens, args.vocab, args.device)
        except Exception as err:  # nor the kernel profile above
            prof["python_top_error"] = f"{type(err).__name__}: {str(err)[:300]}"
    results.setdefault("profile", []).append({"variant": label, **prof})
    print("profile", label, batch, {k: v for k, v in prof.items() if k not in ("top", "host")})
    for stage, entry in prof.get("host", {}).items():
        print(f"   host {entry['ms']:9.3f} ms {entry['calls']:6d}x {stage}")
    for item in prof.get("python_top", [])[:12]:
        print(f"   python {item['own_ms']:9.3f} ms own {item['cum_ms']:9.3f} ms cum {item['calls']:6d}x {item['function']}")
    for item in prof.get("top", []):
        print(f"   {item['ms']:9.3f} ms {item['calls']:6d}x {item['name']}")


def peak_memory_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


class kernels_enabled:
    """Context manager: turn the Triton kernels on or off (``kernels`` and the integer variants vs cuBLAS/aten)."""

    def __init__(self, on: bool):
        self.on, self.before = on, kernels.ENABLED

    def __enter__(self) -> None:
        kernels.ENABLED = self.on

    def __exit__(self, *exc: Any) -> None:
        kernels.ENABLED = self.before


def build_variants(args: argparse.Namespace, dense: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Module, bool]], dict[str, Any]]:
    """``[(label, model, kernels_on)]`` sharing the low-rank weights where the variants allow it."""
    wanted = [v for v in args.variants.split(",") if v]
    if not args.device.startswith("cuda") and "kernels" in wanted:
        wanted.remove("kernels")  # identical to ``fused`` off CUDA
    lowrank = copy.deepcopy(dense)
    ranks = lowrank_like(lowrank, args.ratio, args.rank_multiple)
    fused = copy.deepcopy(lowrank)
    groups = fuse_shared_inputs(fused)
    # kernels on/off changes what a compiled graph guards on: with both variants wanted, each gets its own model
    kernel_model = copy.deepcopy(fused) if "fused" in wanted and "kernels" in wanted else fused
    table = {"dense": (dense, False), "lowrank": (lowrank, False), "fused": (fused, False), "kernels": (kernel_model, True)}
    for label, mode in (("fused_down", "never"), ("fused_eager", "always")):  # other placements of the up products
        if label in wanted:
            model = copy.deepcopy(lowrank)
            fuse_shared_inputs(model, batch_ups=mode)
            table[label] = (model, False)
    for label in wanted:  # integer weights only where asked: each is a full copy of the model
        if label.removesuffix("_aten") in ("int8", "int4", "dense_int8", "dense_int4"):
            source = dense if label.startswith("dense_") else lowrank
            model = integer_weights(copy.deepcopy(source), int(label.removesuffix("_aten")[-1]))
            for module in model.modules():  # "_aten": never the Triton kernel
                if hasattr(module, "prefer_triton"):
                    module.prefer_triton = not label.endswith("_aten")
            table[label] = (model, True)  # kernels on: each factor's prefer_triton decides (off for "_aten")
    unknown = sorted(set(wanted) - set(table))
    if unknown:
        raise SystemExit(f"error: unknown variants {unknown}; choose from dense, lowrank, fused, fused_down, fused_eager, kernels, int8, int4, "
                         "dense_int8, dense_int4 (each integer variant also with the suffix _aten)")
    variants = [(label, *table[label]) for label in wanted]
    targets = sum(s.dense_params for s in decoder_linear_shapes(dense))
    kept = sum(p.numel() for n, p in lowrank.named_parameters() if ".layers." in n and (".up." in n or ".down." in n))
    params = {
        "dense": sum(p.numel() for p in dense.parameters()),
        "lowrank": sum(p.numel() for p in lowrank.parameters()),
        "targeted_kept_ratio": kept / targets,
        "ranks": sorted(set(ranks.values())),
        "fused_groups": groups,
    }
    return variants, params


def add_speedups(row: dict[str, Any], labels: list[str], key: str) -> None:
    for label in [label for label in labels if label != "dense"]:  # dense need not be timed first
        if f"dense_{key}" in row and f"{label}_{key}" in row:
            row[f"speedup_{label}"] = row[f"dense_{key}"] / row[f"{label}_{key}"]


def main() -> None:
    args = parse_args()
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    results: dict[str, Any] = {"machine": machine_info(), "args": vars(args), "micro": [], "prefill": [], "decode": []}

    dense = llama_model(args.layers, dtype, device, **model_shape(args))
    variants, results["params"] = build_variants(args, dense)
    labels = [label for label, _, _ in variants]
    print(f"dense {results['params']['dense']:,} params, low-rank {results['params']['lowrank']:,} "
          f"(targeted kept ratio {results['params']['targeted_kept_ratio']:.3f}); device {device}, dtype {dtype}; {labels}")

    lowrank_model = dict((label, model) for label, model, _ in variants).get("lowrank")
    for tokens in [int(t) for t in args.micro_tokens.split(",") if t] if lowrank_model is not None else []:
        row = micro_layer(dense.model.layers[0], lowrank_model.model.layers[0], tokens, device, dtype, args.repeat)
        results["micro"].append(row)
        print("micro", row)
        write_json(args.out, results)

    for spec in [s for s in args.prefill.split(",") if s]:
        batch, length = (int(v) for v in spec.split("x"))
        row: dict[str, Any] = {"batch": batch, "length": length}
        if args.rounds:
            row.update(interleaved_prefill(variants, batch, length, args, device))
        else:
            for label, model, on in variants:
                if label == "kernels":
                    continue  # eager: the kernels apply only inside torch.compile / CUDA graphs, so this is ``fused``
                peak_memory_reset(device)
                with kernels_enabled(on):
                    row[f"{label}_ms"] = 1e3 * prefill(model, batch, length, args.vocab, device, args.repeat)
                row[f"{label}_peak_gib"] = peak_memory(device)
        add_speedups(row, labels, "ms")
        results["prefill"].append(row)
        print("prefill", {k: v for k, v in row.items() if not k.endswith("_rounds")})
        write_json(args.out, results)

    if args.profile and device.startswith("cuda"):
        results["profile"] = []
        for batch in [int(b) for b in args.decode_batches.split(",") if b]:
            for label, model, on in variants:
                torch._dynamo.reset()
                with kernels_enabled(on):
                    prof = {"variant": label, **profile_decode(model, batch, args.decode_prompt, args.decode_tokens, args.vocab, device)}
                results["profile"].append(prof)
                print("profile", label, batch, f"wall {prof['wall_ms']:.1f} ms, kernels {prof['gpu_kernel_ms']:.1f} ms")
                for item in prof["top"]:
                    print(f"   {item['ms']:9.3f} ms {item['calls']:6d}x {item['name']}")
                write_json(args.out, results)

    modes = ([] if args.no_eager_decode else [False]) + ([True] if device.startswith("cuda") and not args.no_compile else [])
    if args.rounds:
        raise_recompile_limit()  # every variant's graphs stay cached side by side
        for compiled in modes:
            for batch in [int(b) for b in args.decode_batches.split(",") if b]:
                try:
                    row = interleaved_decode(variants, batch, args, device, compiled)
                except Exception as err:  # report, don't hide
                    row = {"batch": batch, "mode": "interleaved", "error": f"{type(err).__name__}: {str(err)[:300]}"}
                add_speedups(row, labels, "ms_per_token")
                results["decode"].append(row)
                print("decode", {k: v for k, v in row.items() if not k.endswith("_rounds")}, flush=True)
                write_json(args.out, results)
                if compiled and args.profile_compiled and "error" not in row:  # compiled by the rounds: no recompile
                    for label, model, on in variants:
                        profile_after_timing(results, model, on, label, batch, args)
                        write_json(args.out, results)
        modes = []
    for compiled in modes:
        for batch in [int(b) for b in args.decode_batches.split(",") if b]:
            row = {"batch": batch, "mode": "static+compile" if compiled else "eager"}
            results["decode"].append(row)  # written after every variant: a run cut short keeps what it measured
            for label, model, on in variants:
                if label == "kernels" and not compiled:
                    continue  # eager: the kernels apply only inside torch.compile / CUDA graphs, so this is ``fused``
                try:
                    if compiled:
                        torch._dynamo.reset()  # one fresh compile per variant (the recompile limit is per code object)
                    peak_memory_reset(device)
                    with kernels_enabled(on):
                        per_token, first = decode_latency(
                            model, batch, args.decode_prompt, args.decode_tokens, args.vocab, device, compiled, args.repeat
                        )
                        row[f"{label}_ms_per_token"] = 1e3 * per_token
                        row[f"{label}_first_call_s"] = first
                        row[f"{label}_peak_gib"] = peak_memory(device)
                    if compiled and args.profile_compiled:
                        profile_after_timing(results, model, on, label, batch, args)
                except Exception as err:  # report, don't hide: the table shows the failure
                    row[f"{label}_error"] = f"{type(err).__name__}: {str(err)[:300]}"
                    print(f"decode {label} failed: {row[f'{label}_error']}")
                gc.collect()
                add_speedups(row, labels, "ms_per_token")
                print("decode", row)
                write_json(args.out, results)

    speedups = [f"speedup_{label}" for label in labels if label != "dense"]
    print()
    print(markdown_table(results["micro"], ["tokens", "dense_ms", "lowrank_ms", "speedup"]))
    print()
    print(markdown_table(results["prefill"], ["batch", "length"] + [f"{label}_ms" for label in labels] + speedups))
    print()
    print(markdown_table(results["decode"], ["mode", "batch"] + [f"{label}_ms_per_token" for label in labels] + speedups))
    write_json(args.out, results)


if __name__ == "__main__":
    main()
