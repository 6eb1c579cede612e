"""Sanity check of quantized factors' accuracy: logit error on held-out tokens of a small correlated model.

NOT the issue's goal (ranking quality of the ML-100K recommender): a cheap check that GPTQ-compensated
int8/int4 factors stay close to the float low-rank model, that GPTQ beats plain rounding end to end, and
how low rank + int8/int4 compares with quantizing the dense model (``dense int4 gptq``: GPTQ W4 g128, one
pass with covariances from the dense model, no act-order) on the same model and data.

The model is a random Llama whose embeddings lie near a low-dimensional subspace (so hidden states are
correlated, as real ones are) fed token sequences from a sparse random Markov chain. It is compressed by
OD-LLM at ``--ratio``; each ``LowRankLinear``'s input covariance is then collected on the calibration
sequences and the factors are quantized (GPTQ and RTN, int8 and int4 g128). Errors are measured against the
dense model on separate held-out sequences: relative logit error ``||L - L_dense|| / ||L_dense||`` and
``KL(dense || variant)`` per sequence, mean and standard error over sequences, and over ``--seeds`` models.
Variants use the dequantized weights in float32 (the quantization error alone); ``*_kernel`` rows run the
int8/int4 CPU kernels (bf16 activations inside) on the same model.

    python benchmarks/quantized_quality.py --seeds 3 --out benchmarks/results/quantized_quality_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
from typing import Any

import torch
from torch import nn

from common import machine_info, markdown_table, write_json  # also puts the repository on sys.path

from optimum_odllm import ODLLMCompressor, ODLLMConfig  # noqa: E402
from optimum_odllm.lowrank import LowRankLinear, set_submodule  # noqa: E402
from optimum_odllm.quantization import (  # noqa: E402
    QuantizedLowRankLinear, dequantize, effective_group_size, quantize_weight,
)

METRICS = ("rel_err_vs_dense", "kl_vs_dense", "top1_vs_dense", "rel_err_vs_lowrank", "kl_vs_lowrank")
QUANT = [("int8", 8, "gptq"), ("int8", 8, "rtn"), ("int4", 4, "gptq"), ("int4", 4, "rtn")]


def correlated_model(seed: int, hidden: int, layers: int, vocab: int, subspace: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128, vocab_size=vocab,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         initializer_range=hidden**-0.5)  # layers as strong as the residual stream, not a no-op
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        basis = torch.randn(subspace, hidden) / subspace**0.5
        model.model.embed_tokens.weight.copy_(torch.randn(vocab, subspace) @ basis + 0.1 * torch.randn(vocab, hidden))
        model.lm_head.weight.normal_(0, 4 * hidden**-0.5)  # peaked next-token distributions (logit std ~4)
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and ".layers." in name:
                module.weight.copy_(power_law_weight(*module.weight.shape))
    return model


def power_law_weight(out_features: int, in_features: int, decay: float = 1.0) -> torch.Tensor:
    """Random orthogonal singular vectors, singular values ``i^-decay``: compressible as trained weights are,
    scaled to the Frobenius norm of an ``N(0, 1/in)`` matrix."""
    k = min(out_features, in_features)
    u, _ = torch.linalg.qr(torch.randn(out_features, k))
    v, _ = torch.linalg.qr(torch.randn(in_features, k))
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -decay
    w = (u * s) @ v.T
    return w * ((out_features * in_features / in_features) ** 0.5 / w.norm())


def markov_tokens(n: int, length: int, vocab: int, seed: int, chain_seed: int, fanout: int = 8) -> torch.Tensor:
    """Sequences from one sparse random Markov chain (``chain_seed``), sampled with ``seed``."""
    chain = torch.Generator().manual_seed(chain_seed)
    successors = torch.randint(0, vocab, (vocab, fanout), generator=chain)
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, length, dtype=torch.long)
    out[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(1, length):
        pick = torch.randint(0, fanout, (n,), generator=g)
        out[:, t] = successors[out[:, t - 1], pick]
    return out


def is_target(name: str, module: nn.Module) -> bool:
    """Factorized projections, or (in the dense model) the decoder ``nn.Linear``s GPTQ W4 would quantize."""
    return isinstance(module, LowRankLinear) or (isinstance(module, nn.Linear) and ".layers." in name
                                                 and not name.endswith((".up", ".down")))


def input_covariances(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``X^T X / tokens`` (float64) of every target module's input over ``ids``."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if is_target(name, module):
            def hook(mod, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + x.T @ x
                counts[name] = counts.get(name, 0) + x.shape[0]
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in ids.split(16):
            model(input_ids=batch)
    for h in hooks:
        h.remove()
    return {k: v / counts[k] for k, v in sums.items()}


def quantized_copy(model: nn.Module, covs: dict[str, torch.Tensor], bits: int, method: str, kernel: bool) -> nn.Module:
    """Low-rank factors -> ``QuantizedLowRankLinear`` (or its dequantized weights); a dense decoder
    ``nn.Linear`` -> its GPTQ/RTN-quantized weights (the dense GPTQ baseline, one pass, same covariances)."""
    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, LowRankLinear):
            q = QuantizedLowRankLinear.from_lowrank(module, covs[name], bits, 128, method)
            set_submodule(out, name, q if kernel else q.dequantize(torch.float32))
        elif is_target(name, module):
            with torch.no_grad():
                group = effective_group_size(module.in_features, 128)  # 704-wide down_proj: g64
                module.weight.copy_(dequantize(quantize_weight(module.weight, covs[name], bits, group, method)))
    return out


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=b).logits.float() for b in ids.split(16)])


def compare(logits: torch.Tensor, reference: torch.Tensor, tag: str) -> dict[str, list[float]]:
    """Per-sequence relative logit error, KL(reference || logits) per token, top-1 agreement."""
    rel = ((logits - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)).tolist()
    logp_ref = torch.log_softmax(reference.double(), -1)
    kl = (logp_ref.exp() * (logp_ref - torch.log_softmax(logits.double(), -1))).sum(-1).mean(-1).tolist()
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean(-1).tolist()
    return {f"rel_err_vs_{tag}": rel, f"kl_vs_{tag}": kl, f"top1_vs_{tag}": top1}


def logit_errors(model: nn.Module, dense: torch.Tensor, lowrank: torch.Tensor, ids: torch.Tensor) -> dict[str, list[float]]:
    logits = logits_of(model, ids)
    return {**compare(logits, dense, "dense"), **compare(logits, lowrank, "lowrank")}


def mean_se(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan"))


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    model = correlated_model(seed, args.hidden, args.layers, args.vocab, args.subspace)
    calib = markov_tokens(args.calibration, args.length, args.vocab, seed=1000 + seed, chain_seed=seed)
    held_out = markov_tokens(args.held_out, args.length, args.vocab, seed=2000 + seed, chain_seed=seed)
    dense_logits = logits_of(model, held_out)
    dense_covs = input_covariances(model, calib)
    dense_gptq = {f"dense {label} {method}": quantized_copy(model, dense_covs, bits, method, False)
                  for label, bits, method in QUANT}
    lowrank = ODLLMCompressor.from_pretrained(model, config=ODLLMConfig(ratio=args.ratio, refine_steps=0)).compress(calib)  # closed form, as measured
    covs = input_covariances(lowrank, calib)
    lowrank_logits = logits_of(lowrank, held_out)
    results = {"lowrank": logit_errors(lowrank, dense_logits, lowrank_logits, held_out)}
    for label, bits, method in QUANT:
        variant = quantized_copy(lowrank, covs, bits, method, False)
        results[f"lowrank+{label} {method}"] = logit_errors(variant, dense_logits, lowrank_logits, held_out)
    for label, bits, _ in QUANT[::2]:
        variant = quantized_copy(lowrank, covs, bits, "gptq", True)
        results[f"lowrank+{label} gptq (kernel)"] = logit_errors(variant, dense_logits, lowrank_logits, held_out)
    for label, variant in dense_gptq.items():
        results[label] = logit_errors(variant, dense_logits, lowrank_logits, held_out)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--subspace", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/quantized_quality_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    per_seed = [run_seed(s, args) for s in range(args.seeds)]
    rows = []
    for variant in per_seed[0]:
        row: dict[str, Any] = {"variant": variant}
        for metric in METRICS:
            within = [mean_se(r[variant][metric]) for r in per_seed]
            seed_means = [m for m, _ in within]
            m, se = mean_se(seed_means)
            row[metric] = f"{m:.4g} ± {se:.2g}"
            row[f"{metric} per seed (mean ± SE over sequences)"] = "; ".join(f"{a:.4g}±{b:.2g}" for a, b in within)
        rows.append(row)
    print(markdown_table(rows, ["variant", *METRICS]))
    print("\n(mean ± SE over seeds of the per-seed means; per-seed SE over held-out sequences in the JSON)")
    write_json(args.out, {"machine": machine_info(), "args": vars(args), "rows": rows, "raw": per_seed})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
