"""A/B of the quantized factors' per-call Python path: a git commit's ``forward`` vs the working tree's.

On a 2-core CPU, a Qwen2.5-0.5B-shaped decode step makes 336 ``QuantizedFactor`` calls, so microseconds of
Python per call show up in the step time. Both models are built alike (equal integer buffers); the reference model's
``QuantizedFactor.forward``/``prepared`` and ``QuantizedLowRankLinear.forward`` are the ones of ``--ref``
(read with ``git show``), bound to its modules. Decode steps as in ``quantized_speed.py`` (KV cache, batch 1),
timed round-robin with bf16 dense, every other round reversed; the logits of both must be identical::

    python benchmarks/forward_ab.py --ref 71267c3 --shape qwen2.5-0.5b --variant lowrank_int8 --rounds 6 \
        --out benchmarks/results/forward_ab_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
import types

import torch

from common import ROOT, machine_info, markdown_table, write_json  # also puts the repository on sys.path
import quantized_speed as qs  # noqa: E402

from optimum_odllm.quantization import qlowrank  # noqa: E402

MODULE_PATH = "optimum_odllm/quantization/qlowrank.py"


def module_at(ref: str) -> types.ModuleType:
    """``optimum_odllm.quantization.qlowrank`` as it was at git ``ref`` (executed inside the current package)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:{MODULE_PATH}"], capture_output=True,
                            text=True, check=True).stdout
    module = types.ModuleType(f"qlowrank_at_{ref}")
    module.__package__ = "optimum_odllm.quantization"
    exec(compile(source, f"{ref}:{MODULE_PATH}", "exec"), module.__dict__)
    return module


def bind_reference_path(model: torch.nn.Module, reference: types.ModuleType) -> int:
    """Bind the reference classes' methods to every quantized module of ``model``; returns the factor count."""
    factors = 0
    for module in model.modules():
        if type(module) is qlowrank.QuantizedFactor:
            for name in ("forward", "prepared"):
                setattr(module, name, types.MethodType(getattr(reference.QuantizedFactor, name), module))
            factors += 1
        elif type(module) is qlowrank.QuantizedLowRankLinear:
            module.forward = types.MethodType(reference.QuantizedLowRankLinear.forward, module)
    return factors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref", required=True, help="git commit whose forward path is the reference")
    parser.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(qs.SHAPES))
    parser.add_argument("--variant", default="lowrank_int8", choices=["lowrank_int8", "lowrank_int4", "dense_int8",
                                                                      "dense_int4"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = qs.SHAPES[args.shape]
    ranks = qs.layer_ranks(shape, 0.5)
    base = qs.build_model(shape, torch.device("cpu"))
    models = {"dense_bf16": base, "reference": qs.swap_model(base, args.variant, ranks),
              "working_tree": qs.swap_model(base, args.variant, ranks)}
    factors = bind_reference_path(models["reference"], module_at(args.ref))
    prompt = torch.randint(0, shape["vocab"], (1, args.prompt))
    token = torch.randint(0, shape["vocab"], (1, 1))

    def decode(model: torch.nn.Module) -> tuple[float, torch.Tensor]:
        with torch.inference_mode():
            cache = model(input_ids=prompt, use_cache=True).past_key_values
            start = time.perf_counter()
            for _ in range(args.steps):
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
            return (time.perf_counter() - start) / args.steps, out.logits

    logits = {name: decode(model)[1] for name, model in models.items()}  # warm-up: kernel layouts
    if not torch.equal(logits["reference"], logits["working_tree"]):
        raise SystemExit("the two forward paths disagree: not an A/B of the same computation")
    samples: dict[str, list[float]] = {name: [] for name in models}
    for r in range(args.rounds):
        for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
            samples[name].append(decode(models[name])[0])
    median = {name: statistics.median(s) for name, s in samples.items()}
    result = {
        "machine": machine_info(), "args": vars(args), "factor_calls_per_step": factors,
        "ms_per_step": {k: 1e3 * v for k, v in median.items()},
        "working_tree_over_reference": median["reference"] / median["working_tree"],
        "per_round": [a / b for a, b in zip(samples["reference"], samples["working_tree"])],
        "speedup_over_dense": {k: median["dense_bf16"] / v for k, v in median.items()},
    }
    print(markdown_table([{"path": k, "ms_per_step": result["ms_per_step"][k],
                           "speedup_over_dense": result["speedup_over_dense"][k]} for k in models],
                         ["path", "ms_per_step", "speedup_over_dense"]))
    print(f"working tree over {args.ref}: {result['working_tree_over_reference']:.3f}x "
          f"(per round {', '.join(f'{x:.3f}' for x in result['per_round'])}); {factors} factor calls per step")
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
