"""Recover recommendation quality after aggressive OD-LLM compression with ``transformers.Trainer``.

    python examples/recover_after_compression.py --output-dir runs/recovery               # MovieLens-100K
    python examples/recover_after_compression.py --output-dir runs/recovery --lora        # LoRA on the factors

Steps: train a small LC-Rec-style recommender (offline Llama + RQ-VAE item index), compress it with
OD-LLM at ``--ratio`` (default 0.3, aggressive), then fine-tune only the low-rank factors (or LoRA
adapters on them) on the same training data for ``--recovery-epochs`` and report HR@K/NDCG@K of
dense / compressed / recovered, plus how much of the lost NDCG@10 the recovery won back.
Writes ``DIR/recovery.json``, ``DIR/recovery.md`` and the recovered checkpoint ``DIR/recovered``
(with model card and ``item_index.json``; load it with ``import optimum_odllm`` +
``AutoModelForCausalLM.from_pretrained``). Needs MovieLens-100K from the recbole wheel
(``pip install --no-deps recbole==1.2.1``) or ``--data-path``.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch
from transformers.utils import logging

from optimum_odllm import ODLLMCompressor, ODLLMConfig, count_parameters
from optimum_odllm.recsys import (
    PACKED_SEQREC_TEMPLATE,
    InstructionEncoder,
    RecDataset,
    build_instruction_samples,
    build_item_index,
    build_offline_model,
    build_offline_tokenizer,
    evaluate_recommender,
    leave_one_out,
    load_movielens_100k,
    train_recommender,
)
from optimum_odllm.recsys.instructions import packed_sequences
from optimum_odllm.recovery import apply_lora_to_factors, mark_factors_trainable, merge_lora


logger = logging.get_logger("optimum_odllm.examples.recovery")
METRICS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True, help="where results and the recovered checkpoint go")
    p.add_argument("--dataset", choices=["ml-100k", "synthetic"], default="ml-100k",
                   help="MovieLens-100K, or a small synthetic catalogue walk (a few minutes on 2 CPU cores)")
    p.add_argument("--data-path", default=None, help="ml-100k directory or recbole .whl (default: installed recbole)")
    p.add_argument("--index-steps", type=int, default=300, help="RQ-VAE training steps of the item index")
    p.add_argument("--ratio", type=float, default=0.3, help="OD-LLM kept ratio (default 0.3: aggressive)")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--epochs", type=float, default=4, help="dense training epochs")
    p.add_argument("--recovery-epochs", type=float, default=4, help="recovery fine-tuning epochs")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--recovery-lr", type=float, default=3e-3)
    p.add_argument("--lora", action="store_true", help="recover with LoRA adapters on the factors (peft)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--max-eval-users", type=int, default=300)
    p.add_argument("--beams", type=int, default=20)
    p.add_argument("--calibration-samples", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def synthetic_dataset(seed: int = 0, users: int = 300, items: int = 120, length: int = 16) -> RecDataset:
    """Users walk genre-coherent item chains with noise: learnable next-item structure, no download."""
    rng = random.Random(seed)
    sequences = {}
    for u in range(users):
        item, seq = rng.randrange(items), []
        for _ in range(length):
            seq.append(item)
            item = (item + rng.choice((1, 1, 2, 3))) % items if rng.random() > 0.1 else rng.randrange(items)
        sequences[f"u{u}"] = seq
    texts = [f"item {i} genre {i % 7} series {i // 10}" for i in range(items)]
    return RecDataset("synthetic-walk", [str(i) for i in range(items)], texts, sequences)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.set_verbosity_warning()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    data = load_movielens_100k(args.data_path) if args.dataset == "ml-100k" else synthetic_dataset(args.seed)
    split = leave_one_out(data.sequences)
    test = split.test[: args.max_eval_users]
    index = build_item_index(data.item_text, data.item_ids, levels=3, codebook_size=32, steps=args.index_steps,
                             seed=args.seed)
    tokenizer = build_offline_tokenizer(data.item_text, index)
    encoder = InstructionEncoder(tokenizer, index, data.item_text)
    samples = build_instruction_samples(encoder, split.train, tasks=("seqrec", "item2index"), packed=True, short=True,
                                        seed=args.seed)

    def evaluate(model) -> dict:
        return evaluate_recommender(model, encoder, test, PACKED_SEQREC_TEMPLATE, num_beams=args.beams, progress=False)

    model = build_offline_model(tokenizer, hidden_size=args.hidden_size, num_layers=args.layers, seed=args.seed)
    model = train_recommender(model, tokenizer, samples, out / "trainer-dense", epochs=args.epochs, learning_rate=args.lr,
                              batch_size=64, seed=args.seed, disable_tqdm=True)
    results: dict = {"dense": {**evaluate(model.eval()), "params": count_parameters(model)}}
    print("dense", results["dense"], flush=True)

    rng = random.Random(args.seed)
    chunks = packed_sequences(split.train, 20)
    calibration = [encoder.prompt_ids(PACKED_SEQREC_TEMPLATE, c) for c in rng.sample(chunks, args.calibration_samples)]
    compressor = ODLLMCompressor.from_pretrained(
        copy.deepcopy(model), tokenizer=tokenizer,
        config=ODLLMConfig(ratio=args.ratio, rank_multiple=8, num_calibration_samples=args.calibration_samples,
                           min_calibration_tokens=16),
    )
    compressed = compressor.compress(calibration)
    compressor.calibration_source = f"{data.name} training sequences ({args.calibration_samples} sampled)"
    results[f"odllm@{args.ratio:g}"] = {**evaluate(compressed.eval()), "params": count_parameters(compressed)}
    print(f"odllm@{args.ratio:g}", results[f"odllm@{args.ratio:g}"], flush=True)

    # recovery fine-tuning: only the factors (or LoRA on them) train; same data, short schedule
    t = time.time()
    trainable = apply_lora_to_factors(compressed, r=args.lora_r) if args.lora else compressed
    if not args.lora:
        mark_factors_trainable(compressed)
    recovered = train_recommender(trainable, tokenizer, samples, out / "trainer-recovery", epochs=args.recovery_epochs,
                                  learning_rate=args.recovery_lr, batch_size=64, seed=args.seed, disable_tqdm=True)
    recovered = merge_lora(recovered).eval()
    name = f"odllm@{args.ratio:g}+recovery" + ("-lora" if args.lora else "")
    results[name] = {**evaluate(recovered), "params": count_parameters(recovered),
                     "recovery_s": round(time.time() - t, 1)}
    print(name, results[name], flush=True)

    dense, low, rec = results["dense"]["NDCG@10"], results[f"odllm@{args.ratio:g}"]["NDCG@10"], results[name]["NDCG@10"]
    results["recovered_fraction_of_lost_NDCG@10"] = round((rec - low) / (dense - low), 3) if dense > low else None
    results["settings"] = vars(args) | {"dataset": data.name, "eval_users": len(test), "total_s": round(time.time() - t0, 1)}

    compressor.model = recovered  # save the recovered factors with the compressor's card and report
    compressor.artifacts["item_index.json"] = Path(index.save(out))
    compressor.save_pretrained(out / "recovered", eval_results={data.name: {m: results[name][m] for m in METRICS}})

    lines = ["| model | params | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for key, r in results.items():
        if isinstance(r, dict) and "HR@10" in r:
            lines.append(f"| {key} | {r['params']:,} | " + " | ".join(f"{r[m]:.4f}" for m in METRICS) + " |")
    table = "\n".join(lines) + f"\n\nRecovered {results['recovered_fraction_of_lost_NDCG@10']} of the NDCG@10 lost to compression.\n"
    (out / "recovery.md").write_text(table)
    (out / "recovery.json").write_text(json.dumps(results, indent=2, default=str))
    print(table)
    return results


if __name__ == "__main__":
    main()
