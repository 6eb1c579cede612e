"""Inference speed of the ML-100K recommender: dense vs OD-LLM vs GPTQ 4-bit vs SparseGPT 50%, side by side.

All variants live in ONE process and are timed round-robin (variant A, B, C, ... then again), so a
noisy neighbour on a shared machine hits all of them alike; the ratios come from one run. Measures:

* ``users_per_s``: end-to-end constrained beam search (beam 20, batch 32, the evaluation code of
  ``optimum_odllm.recsys``) over ``--users`` test users;
* ``prefill_ms``: one forward over real evaluation prompts (``logits_to_keep=1``) at batch 1 and 32;
* ``decode_ms_per_token``: median time of one 1-token forward with the prompt's KV cache (DynamicCache), batch 1 and 32;
* ``peak_rss_mib``: peak RSS of a fresh process that loads only that variant and runs the beam search
  (``--memory-probe``; for a model this small it is dominated by the Python/torch runtime and the data),
  and ``weights_mib`` (bytes of parameters + buffers), which is what differs between variants.

Variants: ``dense`` (fp32), ``odllm`` (OD-LLM at ``--ratio``, fp32, compressed in this process with the
same calibration as quality_vs_size.py), ``odllm-fused`` (shared down-projection GEMMs), ``odllm-fused-bmm``
(the same with one batched product for equal-shaped ``up`` factors, eagerly too: ``batch_ups="always"``),
any of them with the suffix ``+compile`` (its forward compiled for the search, ``recsys.compile_for_search``;
the first call compiles and is reported as ``first_call_s``; the ranked lists are compared with the eager
variant's), ``gptq-w4`` (gptqmodel checkpoint, ``gptq_torch_aten`` int4 kernel, bf16 activations; needs the
gptqmodel venv), ``sparsegpt-50`` (llmcompressor output, stored and run dense, fp32), and with
``--bf16`` also ``dense-bf16`` and ``odllm-bf16`` (same activation dtype as the GPTQ kernel); ``odllm-int8`` /
``odllm-int4``: OD-LLM with integer factors (``factor_bits``, the library's defaults otherwise; on CPU the
aten integer kernels take bf16 activations, cast around each factor).

Run it with the gptqmodel venv's python so that GPTQ is in the same process (it has the same torch
and transformers as the main venv, and imports this repo from the source tree)::

    GPTQMODEL_CPU_WORKERS=2 /tmp/venv-gptqm/bin/python benchmarks/recsys_speed.py --model-dir runs/ml100k/dense \
        --gptq-dir runs/bench_baselines/gptq-w4 --sparsegpt-dir runs/bench_baselines/sparsegpt-50 --bf16 \
        --out benchmarks/results/recsys_speed_cpu.json

(the GPTQ/SparseGPT directories are made by quality_vs_size.py). With the main venv, GPTQ is skipped.
On a GPU: ``--device cuda`` (bf16 by default there; GPTQ needs a CUDA gptqmodel build, see README).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recsys_common as rc  # noqa: E402
from common import machine_info, markdown_table, raise_recompile_limit, write_json  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="runs/ml100k/dense")
    p.add_argument("--gptq-dir", default="runs/bench_baselines/gptq-w4")
    p.add_argument("--sparsegpt-dir", default="runs/bench_baselines/sparsegpt-50")
    p.add_argument("--data-path", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="dtype of dense/odllm/sparsegpt: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--rank-multiple", type=int, default=8)
    p.add_argument("--calibration-samples", type=int, default=256)
    p.add_argument("--variants", default="dense,odllm,odllm-fused,gptq-w4,sparsegpt-50")
    p.add_argument("--bf16", action="store_true", help="also dense-bf16 and odllm-bf16 (CPU)")
    p.add_argument("--users", type=int, default=128, help="test users for the users/s measurement")
    p.add_argument("--beams", type=int, default=20)
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--batches", default="1,32", help="batch sizes for prefill/decode latency")
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds of the users/s measurement")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-RSS subprocesses")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare-reorder", action="store_true",
                   help="also time every variant's beam search with the whole-cache reorder (NAME+plain-reorder)")
    p.add_argument("--compare-repeated", action="store_true",
                   help="also time every variant's beam search with the prompt's cache repeated per beam, i.e. without "
                        "tree attention (NAME+repeated-prompt)")
    p.add_argument("--single-user", type=int, default=0, metavar="N",
                   help="also time N requests of one user each (an on-device app's path): median ms per request with "
                        "the item trie built once (single_user_ms) and rebuilt per request (the old per-call build, with "
                        "today's lazier PrefixTrie)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/recsys_speed_cpu.json")
    return p.parse_args(argv)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


COMPILED = "+compile"  # suffix: the variant with its forward compiled for the search (recsys.compile_for_search)


def build_variant(name: str, args, dense, calibration, device: str, dtype: torch.dtype):
    from optimum_odllm import ODLLMCompressor, ODLLMConfig
    from optimum_odllm.fused import fuse_shared_inputs
    from optimum_odllm.recsys import compile_for_search

    if name.endswith(COMPILED):
        return compile_for_search(build_variant(name.removesuffix(COMPILED), args, dense, calibration, device, dtype))
    if name in ("dense", "dense-bf16"):
        return copy.deepcopy(dense).to(device=device, dtype=torch.bfloat16 if name.endswith("bf16") else dtype)
    if name in ("odllm", "odllm-fused", "odllm-fused-bmm", "odllm-bf16", "odllm-int8", "odllm-int4"):
        model = copy.deepcopy(dense)
        bits = int(name[-1]) if name.startswith("odllm-int") else None
        cfg = ODLLMConfig(ratio=args.ratio, rank_multiple=args.rank_multiple, num_calibration_samples=args.calibration_samples,
                          min_calibration_tokens=16, factor_bits=bits)
        ODLLMCompressor(model, cfg).compress(calibration, device="cpu")
        model = model.to(device=device, dtype=torch.bfloat16 if name.endswith("bf16") else dtype)
        if name.startswith("odllm-fused"):
            fuse_shared_inputs(model, batch_ups="always" if name.endswith("-bmm") else "graphs")
        return model.eval()
    if name == "gptq-w4":
        if device.startswith("cuda"):
            from gptqmodel import GPTQModel

            return GPTQModel.load(args.gptq_dir, device=device).model.eval()
        from recsys_baselines import load_gptq

        return load_gptq(args.gptq_dir)
    if name == "sparsegpt-50":
        model, _, _ = rc.load_recommender(args.sparsegpt_dir)
        return model.to(device=device, dtype=dtype).eval()
    raise ValueError(name)


def weights_mib(model) -> float:
    return (sum(p.numel() * p.element_size() for p in model.parameters())
            + sum(b.numel() * b.element_size() for b in model.buffers())) / 2**20


@torch.no_grad()
def time_users(model, encoder, users, args, device, rankings: list | None = None) -> float:
    """Seconds to rank ``users`` (their ranked lists are appended to ``rankings`` if given)."""
    from optimum_odllm.recsys import PACKED_SEQREC_TEMPLATE, recommend

    sync(device)
    t = time.perf_counter()
    ranked = recommend(model, encoder, users, PACKED_SEQREC_TEMPLATE, num_beams=args.beams, batch_size=args.eval_batch,
                       progress=False)
    sync(device)
    seconds = time.perf_counter() - t
    if rankings is not None:
        rankings.append(ranked)
    return seconds


@contextlib.contextmanager
def _trie_attribute(name: str, value):
    """Replace ``optimum_odllm.recsys.trie.<name>`` while the block runs (the searches below look it up there)."""
    from optimum_odllm.recsys import trie

    original = getattr(trie, name)
    setattr(trie, name, value)
    try:
        yield
    finally:
        setattr(trie, name, original)


def whole_cache_reorder():
    """The beam search as before 2026-12-02 16:50 UTC: ``reorder_cache`` copies every row's whole cache (prompt
    included) at each intermediate step, instead of only the generated positions (``trie.reorder_beams``).
    No cache layer passes the type check, which also turns the shared-prompt search off."""
    return _trie_attribute("DynamicLayer", type("NotADynamicLayer", (), {}))


def repeated_prompt():
    """The beam search as before 2026-12-02 20:00 UTC: the prompt's cache repeated once per beam, generated
    positions reordered in place (``trie.reorder_beams``), instead of one shared copy read through a tree mask."""
    return _trie_attribute("shares_prompt_cache", lambda model, cache: False)


def single_user_latency(models: dict, encoder, requests: list, args, device: str, results: dict) -> None:
    """Median ms to rank one user, per variant, round-robin: with the encoder's item trie built once, and with it
    rebuilt for every request (what ``recommend`` did before it kept the trie on the encoder)."""
    cached: dict[str, list[float]] = {n: [] for n in models}
    rebuilt: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            for example in requests:
                encoder.trie  # noqa: B018 -- built before the clock starts: the cached path
                cached[name].append(time_users(model, encoder, [example], args, device))
                encoder._trie = None
                rebuilt[name].append(time_users(model, encoder, [example], args, device))
    for name in models:
        results["variants"][name]["single_user_ms"] = 1e3 * statistics.median(cached[name])
        results["variants"][name]["single_user_ms_trie_per_request"] = 1e3 * statistics.median(rebuilt[name])
    print({n: round(results["variants"][n]["single_user_ms"], 2) for n in models}, flush=True)


def median_time(fn, device: str, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def latencies(model, prompt: list[int], batch: int, args, device: str) -> dict[str, float]:
    """Prefill: median forward time over the prompt. Decode: median time of one 1-token forward with the
    KV cache of the prompt (the step the beam search repeats), over ``decode_tokens`` steps x ``repeat`` runs."""
    from transformers.cache_utils import DynamicCache

    ids = torch.tensor([prompt] * batch, device=device)
    prefill = median_time(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), device, 2, args.repeat)
    steps: list[float] = []
    for rep in range(args.repeat + 1):
        cache = DynamicCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(args.decode_tokens):
            sync(device)
            t = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            sync(device)
            if rep:  # the first run is warm-up
                steps.append(time.perf_counter() - t)
            cache = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
    return {"prefill_ms": 1e3 * prefill, "decode_ms_per_token": 1e3 * statistics.median(steps)}


def setup(args):
    from optimum_odllm.recsys import InstructionEncoder, PACKED_SEQREC_TEMPLATE

    data, split = rc.load_split(args.data_path)
    dense, tokenizer, index = rc.load_recommender(args.model_dir)
    encoder = InstructionEncoder(tokenizer, index, data.item_text)
    users = rc.eval_users(split, args.users, args.seed)
    calibration = rc.calibration_ids(encoder, split, args.calibration_samples, args.seed)
    prompts = [encoder.prompt_ids(PACKED_SEQREC_TEMPLATE, ex.history) for ex in users]
    lengths = [len(p) for p in prompts]
    common_len = max(set(lengths), key=lengths.count)
    prompt = next(p for p in prompts if len(p) == common_len)
    return dense, encoder, users, calibration, prompt


def memory_probe(args) -> None:
    """Fresh process: load one variant, run the beam search over the users, print peak RSS."""
    torch.set_num_threads(args.threads)
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    dense, encoder, users, calibration, _ = setup(args)
    model = build_variant(args.memory_probe, args, dense, calibration, device, dtype)
    del dense
    gc.collect()
    rss_before = _rss_mib()
    time_users(model, encoder, users[: args.eval_batch], args, device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": peak, "rss_after_load_mib": rss_before, "weights_mib": weights_mib(model)}))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.memory_probe:
        memory_probe(args)
        return {}
    torch.set_num_threads(args.threads)
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    dense, encoder, users, calibration, prompt = setup(args)
    names = [v for v in args.variants.split(",") if v] + (["dense-bf16", "odllm-bf16"] if args.bf16 else [])
    results: dict[str, Any] = {"machine": machine_info(), "args": vars(args), "prompt_len": len(prompt),
                               "eval_users": len(users), "variants": {}}
    models = {}
    for name in names:
        try:
            t = time.perf_counter()
            models[name] = build_variant(name, args, dense, calibration, device, dtype)
            results["variants"][name] = {"build_s": time.perf_counter() - t, "weights_mib": weights_mib(models[name]),
                                         "params": sum(p.numel() for p in models[name].parameters())}
            if name == "gptq-w4":
                results["variants"][name]["qlinear"] = type(models[name].model.layers[0].mlp.down_proj).__name__
        except Exception as err:
            results["variants"][name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            print(f"{name}: not available ({results['variants'][name]['error']})", flush=True)
    del dense
    gc.collect()

    if any(name.endswith(COMPILED) for name in models):  # torch without isolate_recompiles: one shared limit
        raise_recompile_limit()
    # warm-up (first call compiles "+compile" variants, repacks int4 weights, fills caches), then round-robin users/s
    for name, model in models.items():
        results["variants"][name]["first_call_s"] = time_users(model, encoder, users[: args.eval_batch], args, device)
    per: dict[str, list[float]] = {n: [] for n in models}
    searches = [(suffix, context) for suffix, context, wanted in (
        ("+plain-reorder", whole_cache_reorder, args.compare_reorder),
        ("+repeated-prompt", repeated_prompt, args.compare_repeated)) if wanted]
    plain = {f"{n}{suffix}": (n, context) for suffix, context in searches for n in models}
    per.update({label: [] for label in plain})
    rankings: dict[str, list] = {label: [] for label in per}
    for _ in range(args.rounds):
        for name, model in models.items():
            per[name].append(time_users(model, encoder, users, args, device, rankings[name]))
        for label, (name, context) in plain.items():
            with context():
                per[label].append(time_users(models[name], encoder, users, args, device, rankings[label]))
    for name in [*models, *plain]:
        results["variants"].setdefault(name, {})["users_per_s"] = len(users) / statistics.median(per[name])
        results["variants"][name]["users_per_s_all_rounds"] = [len(users) / s for s in per[name]]
    for label, (name, _) in plain.items():  # do the searches rank alike? (first round; float rounding may swap ties)
        same = [a == b for a, b in zip(rankings[label][0], rankings[name][0])]
        results["variants"][label]["same_ranked_list_as_default"] = sum(same) / len(same)
    for name in [n for n in models if n.endswith(COMPILED) and n.removesuffix(COMPILED) in models]:
        same = [a == b for a, b in zip(rankings[name][0], rankings[name.removesuffix(COMPILED)][0])]
        results["variants"][name]["same_ranked_list_as_eager"] = sum(same) / len(same)
    write_json(args.out, results)
    print({n: round(results["variants"][n]["users_per_s"], 2) for n in per}, flush=True)
    if args.single_user:
        single_user_latency(models, encoder, users[: args.single_user], args, device, results)
        write_json(args.out, results)

    for batch in [int(b) for b in args.batches.split(",") if b]:
        for name, model in models.items():
            row = latencies(model, prompt, batch, args, device)
            results["variants"][name][f"prefill_ms_b{batch}"] = row["prefill_ms"]
            results["variants"][name][f"decode_ms_per_token_b{batch}"] = row["decode_ms_per_token"]
            print(name, batch, row, flush=True)
        write_json(args.out, results)

    if not args.no_memory and not device.startswith("cuda"):
        for name in models:
            cmd = [sys.executable, __file__, "--memory-probe", name, *[a for a in (argv or sys.argv[1:])]]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            try:
                results["variants"][name].update(json.loads(proc.stdout.strip().splitlines()[-1]))
            except (IndexError, json.JSONDecodeError):
                results["variants"][name]["peak_rss_error"] = proc.stderr[-300:]
        write_json(args.out, results)
    elif device.startswith("cuda"):
        for name, model in models.items():
            torch.cuda.reset_peak_memory_stats()
            time_users(model, encoder, users[: args.eval_batch], args, device)
            results["variants"][name]["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20

    base = results["variants"].get("dense", {})
    rows = []
    for name, r in results["variants"].items():
        row = {"variant": name, **r}
        for key in ("users_per_s",):
            if key in base and key in r:
                row["speedup_users_per_s"] = r[key] / base[key]
        if "single_user_ms" in base and "single_user_ms" in r:
            row["speedup_single_user"] = base["single_user_ms"] / r["single_user_ms"]
        for b in [b for b in args.batches.split(",") if b]:
            for key in (f"prefill_ms_b{b}", f"decode_ms_per_token_b{b}"):
                if key in base and key in r:
                    row[f"speedup_{key}"] = base[key] / r[key]
        rows.append(row)
    results["table"] = rows
    cols = ["variant", "weights_mib", "peak_rss_mib", "users_per_s", "speedup_users_per_s"]
    if args.single_user:
        cols += ["single_user_ms", "single_user_ms_trie_per_request", "speedup_single_user"]
    for b in [b for b in args.batches.split(",") if b]:
        cols += [f"prefill_ms_b{b}", f"decode_ms_per_token_b{b}", f"speedup_decode_ms_per_token_b{b}"]
    table = markdown_table(rows, cols)
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    print(table)
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
