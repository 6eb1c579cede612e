"""Shared pieces of the recommender benchmarks (quality_vs_size.py, recsys_speed.py, recsys_baselines.py).

* loading the trained ML-100K LC-Rec recommender saved by ``examples/ml100k_end_to_end.py``
  (``DIR/dense``: model + tokenizer + ``item_index.json``) or training one with the same recipe;
* the evaluation split and the calibration data (packed training sequences, never test targets,
  same sampling as the example);
* two cheap low-rank baselines that are not part of the library, as small pure functions:
  ASVD-style activation scaling and FWSVD-style Fisher weighting;
* storage-size accounting used for the x axis of the quality plot.

Runs under the main venv and under the gptqmodel venv (``/tmp/venv-gptqm``: same torch/transformers),
which is how the GPTQ int4 model gets evaluated with the same code.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HISTORY = 20
METRICS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")


def default_data_path() -> str | None:
    """ml-100k inside the recbole wheel of the main venv (other venvs do not have recbole)."""
    spec = importlib.util.find_spec("recbole")
    if spec is not None and spec.submodule_search_locations:
        return None  # the library finds it itself
    for cand in sorted((ROOT / ".venv" / "lib").glob("python*/site-packages/recbole/dataset_example/ml-100k")):
        return str(cand)
    return None


def load_split(data_path: str | None = None, history: int = HISTORY):
    from optimum_odllm.recsys import leave_one_out, load_movielens_100k

    data = load_movielens_100k(data_path or default_data_path())
    return data, leave_one_out(data.sequences, history=history)


def load_recommender(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, index) of a saved recommender directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_odllm  # noqa: F401  (registers quant_method="odllm" for compressed checkpoints)
    from optimum_odllm.recsys import ItemIndex

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    index = ItemIndex.load(model_dir)
    return model, tokenizer, index


def train_recommender_like_example(out_dir: Path, data, split, hidden: int = 256, layers: int = 2, heads: int = 4,
                                   epochs: float = 6, lr: float = 2e-3, batch_size: int = 64, seed: int = 0,
                                   levels: int = 3, codebook_size: int = 64) -> Path:
    """The recipe of examples/ml100k_end_to_end.py (same defaults), saved to ``out_dir/dense``."""
    import numpy as np

    from optimum_odllm.recsys import (build_instruction_samples, build_item_index, build_offline_model,
                                      build_offline_tokenizer, InstructionEncoder, train_recommender)

    random.seed(seed); np.random.seed(seed); torch.manual_seed(seed)
    index = build_item_index(data.item_text, data.item_ids, levels=levels, codebook_size=codebook_size, steps=1500, seed=seed)
    tokenizer = build_offline_tokenizer(data.item_text, index)
    encoder = InstructionEncoder(tokenizer, index, data.item_text)
    samples = build_instruction_samples(encoder, split.train, tasks=("seqrec", "item2index"), history=HISTORY,
                                        packed=True, short=True, seed=seed)
    model = build_offline_model(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=heads, seed=seed)
    model = train_recommender(model, tokenizer, samples, out_dir / "trainer", epochs=epochs, learning_rate=lr,
                              batch_size=batch_size, seed=seed)
    dense_dir = out_dir / "dense"
    model.eval().save_pretrained(dense_dir)
    tokenizer.save_pretrained(dense_dir)
    index.save(dense_dir)
    return dense_dir


def calibration_ids(encoder, split, n: int, seed: int = 0) -> list[list[int]]:
    """Same calibration as examples/ml100k_end_to_end.py: ``n`` random packed training chunks."""
    from optimum_odllm.recsys import PACKED_SEQREC_TEMPLATE
    from optimum_odllm.recsys.instructions import packed_sequences

    rng = random.Random(seed)
    chunks = packed_sequences(split.train, HISTORY)
    return [encoder.prompt_ids(PACKED_SEQREC_TEMPLATE, c) for c in rng.sample(chunks, n)]


def eval_users(split, max_users: int | None, seed: int = 0):
    """Fixed subset of test users: the first ``max_users`` of a seeded shuffle (all if None)."""
    test = list(split.test)
    if max_users is None or max_users >= len(test):
        return test
    rng = random.Random(seed)
    order = list(range(len(test)))
    rng.shuffle(order)
    return [test[k] for k in sorted(order[:max_users])]


def evaluate(model, encoder, examples, beams: int = 20, batch_size: int = 32) -> dict[str, float]:
    from optimum_odllm.recsys import PACKED_SEQREC_TEMPLATE, evaluate_recommender

    with torch.no_grad():
        return evaluate_recommender(model, encoder, examples, PACKED_SEQREC_TEMPLATE, num_beams=beams,
                                    batch_size=batch_size, progress=False)


# ---------------------------------------------------------------------------------------------------
# Targets, ranks and the two extra low-rank baselines
# ---------------------------------------------------------------------------------------------------

def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder layers (what OD-LLM targets by default)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


def allocate(model: nn.Module, ratio: float, rank_multiple: int) -> dict[str, int | None]:
    """Exactly the compressor's rank allocation (incl. 'keep dense if factors are not smaller')."""
    from optimum_odllm.ranks import ModuleShape, allocate_ranks

    shapes = [ModuleShape(n, m.in_features, m.out_features) for n, m in decoder_linears(model).items()]
    ranks = allocate_ranks(shapes, ratio, rank_multiple)
    for s in shapes:
        if ranks[s.name] is not None and s.lowrank_params(ranks[s.name]) >= s.dense_params:
            ranks[s.name] = None
    return ranks


def _batches_by_length(ids: Sequence[Sequence[int]], batch: int = 16):
    by_len: dict[int, list[list[int]]] = {}
    for s in ids:
        by_len.setdefault(len(s), []).append(list(s))
    for seqs in by_len.values():
        for k in range(0, len(seqs), batch):
            yield torch.tensor(seqs[k:k + batch])


@torch.no_grad()
def activation_scales(model: nn.Module, calibration: Sequence[Sequence[int]], alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """ASVD: per input channel ``mean_t |x_t| ** alpha`` of every decoder Linear on the dense model."""
    targets = decoder_linears(model)
    sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in targets.items()}
    count = {"tokens": 0}
    def make_hook(n: str):
        def hook(mod, args) -> None:  # must return None (a returned value would replace the input)
            x = args[0].detach()
            sums[n].add_(x.abs().double().reshape(-1, x.shape[-1]).sum(0))
        return hook

    hooks = [m.register_forward_pre_hook(make_hook(n)) for n, m in targets.items()]
    try:
        for ids in _batches_by_length(calibration):
            model(input_ids=ids, use_cache=False)
            count["tokens"] += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    return {n: (s / count["tokens"]).clamp_min(1e-6) ** alpha for n, s in sums.items()}


def fisher_row_importance(model: nn.Module, calibration: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """FWSVD: per output row ``sum_samples sum_j (dL/dW_ij)^2`` (empirical Fisher, one sample per backward)."""
    targets = decoder_linears(model)
    acc = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in targets.items()}
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for m in targets.values():
        m.weight.requires_grad_(True)
    try:
        for seq in calibration:
            ids = torch.tensor([list(seq)])
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            for n, m in targets.items():
                acc[n] += m.weight.grad.double().pow(2).sum(1)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        model.train(was_training)
    return acc


@torch.no_grad()
def input_covariances(model: nn.Module, modules: dict[str, nn.Module], batches) -> dict[str, torch.Tensor]:
    """``X^T X`` (float64, on the model's device) of each module's input over ``batches`` of input ids."""
    device = next(model.parameters()).device
    cov = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=device) for n, m in modules.items()}

    def make_hook(name: str):
        def hook(module, args) -> None:  # returns None: a returned value would replace the input
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            cov[name].add_(x.T @ x)
        return hook

    hooks = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    try:
        for ids in batches:
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return cov


@torch.no_grad()
def gptq_dense_fake_quantize(model: nn.Module, calibration: Sequence[Sequence[int]], bits: int,
                             group_size: int = 128, damping: float = 0.01) -> None:
    """In place: GPTQ baseline on the *dense* decoder linears (every weight replaced by its dequantized codes).

    Sequential like GPTQ: layer by layer, the input covariance of each linear is collected with the layers before
    it already quantized (inside a layer all linears see the unquantized layer; gptqmodel's default goes module by
    module there too, so this baseline can be slightly weaker), then every linear is quantized with the library's GPTQ
    solver (``optimum_odllm.quantization.quantize_weight``: asymmetric, ``group_size`` columns per
    bfloat16 scale and zero; 3 bits on the same grid with 8 levels). Stored size: ``bits + 32 / group_size``
    bits per weight (:func:`grouped_storage_bits_per_weight`).
    """
    from optimum_odllm.quantization import dequantize, quantize_weight
    from optimum_odllm.quantization.gptq import effective_group_size

    layers = sorted({n.split(".layers.")[0] + ".layers." + n.split(".layers.")[1].split(".")[0]
                     for n in decoder_linears(model)}, key=lambda n: int(n.rsplit(".", 1)[1]))
    for layer in layers:
        targets = {n: m for n, m in decoder_linears(model).items() if n.startswith(layer + ".")}
        hessians = input_covariances(model, targets, _batches_by_length(calibration))
        for n, m in targets.items():
            group = effective_group_size(m.in_features, group_size) if bits != 8 else None
            q = quantize_weight(m.weight.detach(), hessians[n], bits, group, "gptq", damping)
            m.weight.copy_(dequantize(q, m.weight.dtype))


def grouped_storage_bits_per_weight(bits: int, group_size: int = 128) -> float:
    """Bits per weight of this library's grid: ``bits`` codes plus a bfloat16 scale and zero per group (int8:
    one bfloat16 scale per row, counted by the caller)."""
    return bits + 32 / group_size


def _write(model: nn.Module, name: str, module: nn.Linear, up: torch.Tensor, down: torch.Tensor) -> None:
    from optimum_odllm.lowrank import LowRankLinear, set_submodule

    new = LowRankLinear.from_factors(up, down, None if module.bias is None else module.bias.detach(), dtype=module.weight.dtype)
    set_submodule(model, name, new.eval())


@torch.no_grad()
def scaled_svd_compress(model: nn.Module, ranks: dict[str, int | None], col_scale: dict[str, torch.Tensor] | None = None,
                        row_scale: dict[str, torch.Tensor] | None = None) -> None:
    """In place: ``W ~= diag(r)^-1 [SVD_k(diag(r) W diag(c))] diag(c)^-1``.

    ``col_scale`` = ASVD activation scales (input side), ``row_scale`` = sqrt of FWSVD Fisher row
    importance (output side). Neither given = plain truncated SVD.
    """
    for name, module in list(decoder_linears(model).items()):
        rank = ranks.get(name)
        if rank is None:
            continue
        w = module.weight.detach().double()
        c = col_scale[name].double() if col_scale else torch.ones(w.shape[1], dtype=torch.float64)
        r = row_scale[name].double() if row_scale else torch.ones(w.shape[0], dtype=torch.float64)
        r = r.clamp_min(r.max() * 1e-8 + 1e-30)
        u, s, vh = torch.linalg.svd(r[:, None] * w * c[None, :], full_matrices=False)
        root = s[:rank].sqrt()
        up = (u[:, :rank] * root) / r[:, None]
        down = (root[:, None] * vh[:rank]) / c[None, :]
        _write(model, name, module, up.float(), down.float())


# ---------------------------------------------------------------------------------------------------
# Size accounting
# ---------------------------------------------------------------------------------------------------

def decoder_linear_params(model: nn.Module) -> int:
    """Parameters held by the decoder-layer Linears (dense or factorized)."""
    return sum(p.numel() for n, p in model.named_parameters()
               if ".layers." in n and (n.endswith("proj.weight") or ".up." in n or ".down." in n or n.endswith("proj.bias")))


def gptq_storage_bits_per_weight(group_size: int = 128, in_features: int | None = None, bits: int = 4) -> float:
    """Stored bits per weight of a gptqmodel GPTQ checkpoint (asym, desc_act=False).

    qweight: ``bits``; scales: fp16 per (group, out) -> 16/group; qzeros: ``bits`` per (group, out) -> bits/group;
    g_idx: int32 per input column -> 32/out_features (ignored here: < 0.2 bit for our shapes, reported separately).
    """
    return bits + 16 / group_size + bits / group_size


def state_dict_bytes(state: dict[str, torch.Tensor], predicate=lambda name: True) -> int:
    return sum(t.numel() * t.element_size() for n, t in state.items() if predicate(n))
