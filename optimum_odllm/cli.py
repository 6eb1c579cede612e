"""``optimum-cli odllm compress|evaluate|train|export`` (and the ``optimum-odllm`` console-script fallback).

Argument definitions live in :mod:`optimum_odllm.cli_options` (stdlib only, so ``optimum-cli`` stays
fast); this module does the work and is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from transformers.utils import logging

from .cli_options import build_parser
from .exporters.cli import run_export


logger = logging.get_logger("optimum_odllm.cli")

METRIC_ORDER = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")


class CLIError(SystemExit):
    """A user error: printed as ``error: ...`` without a traceback, exit status 2."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


def _setup_logging() -> None:
    """Our own INFO messages (jitter, ranks, resume) on stderr; transformers' at WARNING (no config dumps)."""
    import logging as std_logging

    logging.set_verbosity_warning()
    logging.enable_progress_bar()
    ours = std_logging.getLogger("optimum_odllm")
    if not ours.handlers:
        handler = std_logging.StreamHandler()
        handler.setFormatter(std_logging.Formatter("[optimum-odllm] %(message)s"))
        ours.addHandler(handler)
    ours.setLevel(std_logging.INFO)
    ours.propagate = False


# ---------------------------------------------------------------------------------------------- data
def load_rec_dataset(dataset: str, data_path: str | None = None, items: str | None = None):
    """``ml-100k`` | ``amazon:REVIEWS`` | an interaction table path -> :class:`~optimum_odllm.recsys.RecDataset`."""
    from .recsys import load_amazon_reviews, load_interactions_table, load_movielens_100k

    if dataset.lower() in ("ml-100k", "ml100k", "movielens-100k"):
        return load_movielens_100k(data_path)
    if dataset.startswith("amazon:"):
        return load_amazon_reviews(dataset.split(":", 1)[1], meta=items)
    if Path(dataset).is_file():
        return load_interactions_table(dataset, items=items)
    raise CLIError(
        f"unknown --dataset {dataset!r}: use 'ml-100k', 'amazon:PATH/reviews.json.gz' or an existing "
        "CSV/TSV/JSON(L)/Parquet interaction table."
    )


def _recsys_context(model_dir: str | Path, tokenizer: Any, args: argparse.Namespace):
    """Dataset, leave-one-out split, item index (from ``model_dir``) and instruction encoder."""
    from .recsys import INDEX_FILE, InstructionEncoder, ItemIndex, leave_one_out

    if not args.dataset:
        raise CLIError("this needs the recommender's data: pass --dataset (e.g. --dataset ml-100k).")
    index_path = _resolve_file(str(model_dir), INDEX_FILE, getattr(args, "revision", None), getattr(args, "token", None))
    if index_path is None:
        raise CLIError(
            f"{model_dir} has no {INDEX_FILE}: it is not a recommender trained with optimum_odllm.recsys. "
            "Train one with `optimum-cli odllm train` or use another --calibration source."
        )
    index = ItemIndex.load(index_path)
    data = load_rec_dataset(args.dataset, args.data_path, args.items)
    if index.item_ids and list(index.item_ids) != list(data.item_ids):
        raise CLIError(
            f"the item index in {model_dir} was built for another item catalogue than --dataset {args.dataset} "
            f"({len(index.item_ids)} vs {len(data.item_ids)} items): evaluate on the data the model was trained on."
        )
    split = leave_one_out(data.sequences, history=args.history)
    encoder = InstructionEncoder(tokenizer, index, data.item_text)
    return data, split, index, encoder


def _resolve_file(model: str, filename: str, revision: str | None = None, token: str | None = None) -> Path | None:
    local = Path(model)
    if local.is_dir():
        return local / filename if (local / filename).is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(model, filename, revision=revision, token=token))
    except Exception as err:  # offline, missing file, no such repo
        logger.info(f"could not fetch {filename} from {model}: {err}")
        return None


def load_calibration(args: argparse.Namespace, model_path: str, tokenizer: Any) -> tuple[Any, str | None]:
    """The ``--calibration`` source as something ``ODLLMCompressor.compress`` accepts, plus a description."""
    spec = args.calibration
    n = args.num_calibration_samples
    if spec.lower() == "none":
        if args.whitening or args.progressive:
            raise CLIError("--calibration none (data-free) only works with --no-whitening --no-progressive.")
        return None, None
    if spec.lower() == "recsys":
        from .recsys import PACKED_SEQREC_TEMPLATE
        from .recsys.instructions import packed_sequences

        if tokenizer is None:
            raise CLIError(f"{model_path} has no tokenizer files; the recommender's data cannot be encoded.")
        data, split, _, encoder = _recsys_context(model_path, tokenizer, args)
        chunks = packed_sequences(split.train, args.history)
        rng = random.Random(args.seed)
        chosen = rng.sample(chunks, min(n, len(chunks)))
        ids = [encoder.prompt_ids(PACKED_SEQREC_TEMPLATE, c) for c in logging.tqdm(chosen, desc="calibration prompts")]
        return ids, f"{data.name} training sequences (recsys, {len(ids)} sampled, seed {args.seed})"
    path = Path(spec)
    if path.is_file() and path.suffix.lower() in (".txt", ".text"):
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise CLIError(f"calibration file {spec} has no non-empty lines.")
        return lines[:n], f"text file {path.name} ({min(n, len(lines))} lines)"
    import datasets

    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[args.dataset_split]
        desc = f"dataset directory {path.name}"
    elif path.is_file():
        fmt = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(path.suffix.lower())
        if fmt is None:
            raise CLIError(f"cannot read calibration file {spec}: use .txt, .csv, .tsv, .json, .jsonl or .parquet.")
        kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
        desc = f"file {path.name}"
    else:
        try:
            stream = datasets.load_dataset(spec, args.dataset_config, split=args.dataset_split, streaming=True)
            ds = datasets.Dataset.from_list(list(stream.take(n)))
        except Exception as err:
            raise CLIError(
                f"could not load calibration dataset {spec!r} ({type(err).__name__}: {err}). Give a local file, "
                "a datasets directory, 'recsys' or a Hub dataset name reachable from this machine."
            ) from err
        desc = f"Hub dataset {spec}" + (f" ({args.dataset_config})" if args.dataset_config else "") + f", split {args.dataset_split}"
    if "input_ids" not in ds.column_names:
        if args.text_column not in ds.column_names:
            raise CLIError(f"calibration data has no column {args.text_column!r} (columns: {ds.column_names}); use --text-column.")
        if args.text_column != "text":
            ds = ds.rename_column(args.text_column, "text")
    ds = ds.select(range(min(n, len(ds))))
    return ds, f"{desc}, {len(ds)} sequences"


# ---------------------------------------------------------------------------------------------- compress
def check_device(requested: str | None) -> None:
    """Refuse a device string torch does not know, or CUDA on a machine without it, before loading anything."""
    import torch

    if requested is None:
        return
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError) as err:
        raise CLIError(f"--device {requested!r} is not a device torch knows ({err}); use e.g. cpu or cuda.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {requested}: CUDA is not available on this machine (torch {torch.__version__}); use --device cpu.")


def run_compress(args: argparse.Namespace) -> Path:
    """Load, compress, save (and optionally push)."""
    import torch

    from . import ODLLMCompressor, ODLLMConfig
    from .checkpointing import CHECKPOINT_DIRNAME
    from .settings import SETTING_NAMES

    config = ODLLMConfig(**{name: getattr(args, name) for name in SETTING_NAMES})
    check_device(args.device)
    model_kwargs: dict[str, Any] = {}
    if args.dtype:
        model_kwargs["dtype"] = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.revision and not args.push_to_hub:
        model_kwargs["revision"] = args.revision
    logger.info(f"Loading {args.model}")
    compressor = ODLLMCompressor.from_pretrained(args.model, config=config, **model_kwargs)
    calibration, description = load_calibration(args, args.model, compressor.tokenizer)
    compressor.calibration_source = description
    if compressor.tokenizer is not None and getattr(compressor.tokenizer, "pad_token", None) is None:
        compressor.tokenizer.pad_token = compressor.tokenizer.eos_token
    checkpoint_dir = Path(args.output) / CHECKPOINT_DIRNAME if args.resume else None
    compressor.compress(calibration, device=args.device, checkpoint_dir=checkpoint_dir, resume=args.resume)
    report = compressor.report
    out = compressor.save_pretrained(args.output)
    print(
        f"Compressed {args.model} -> {out}: {report.params_before:,} -> {report.params_after:,} parameters "
        f"(kept {report.kept_ratio:.3f} of the targeted ones) in {sum(report.stage_seconds.values()):.1f}s."
    )
    if args.push_to_hub:
        info = compressor.push_to_hub(args.push_to_hub, private=args.private or None, revision=args.revision, token=args.token)
        print(f"Pushed to {getattr(info, 'commit_url', args.push_to_hub)}")
    return out


# ---------------------------------------------------------------------------------------------- evaluate
def format_metrics_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per model/dataset, HR@K/NDCG@K columns (``value ± standard error`` when known)."""
    metrics = [m for m in METRIC_ORDER if any(m in r for r in results.values())]
    metrics += sorted({m for r in results.values() for m in r
                       if m not in metrics and m != "users" and not m.endswith("_se")})
    lines = ["| model | users | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for name, r in results.items():
        cells = [("-" if m not in r else f"{r[m]:.4f}" + (f" ± {r[m + '_se']:.4f}" if m + "_se" in r else ""))
                 for m in metrics]
        lines.append(f"| {name} | {r.get('users', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _device(requested: str | None):
    import torch

    return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))


def run_evaluate(args: argparse.Namespace) -> dict[str, float]:
    """Rank the test (or valid) users and print HR@K/NDCG@K with standard errors.

    Under ``accelerate launch`` every process loads the model on its own device, ranks a share of the users,
    and the per-user values are gathered (:mod:`optimum_odllm.recsys.distributed`), so the metrics equal a
    one-process run exactly; only the main process prints and writes files.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_odllm  # noqa: F401  (registers the odllm loader)

    from .recsys import PACKED_SEQREC_TEMPLATE, SEQREC_TEMPLATES, evaluate_recommender
    from .recsys.distributed import is_main_process, launched_state

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data, split, _, encoder = _recsys_context(args.model, tokenizer, args)
    examples = split.test if args.split == "test" else split.valid
    if args.max_users:
        examples = examples[: args.max_users]
    if not examples:
        raise CLIError(f"{data.name} has no {args.split} users (every user needs >= 3 interactions).")
    state = launched_state()
    device = state.device if state is not None else _device(args.device)
    model = AutoModelForCausalLM.from_pretrained(args.model).to(device)
    if args.compile:
        from .recsys import compile_for_search

        compile_for_search(model)
    template = PACKED_SEQREC_TEMPLATE if args.template == "packed" else SEQREC_TEMPLATES[0]
    metrics = evaluate_recommender(model, encoder, examples, template, num_beams=args.beams, batch_size=args.batch_size,
                                   progress=is_main_process(), train=split.train,
                                   exclude_history=args.exclude_history, with_stderr=True)
    processes = 1 if state is None else state.num_processes
    if not is_main_process():
        return metrics
    masked = "seen items excluded" if _history_excluded(split.train, args.exclude_history) else "seen items allowed"
    print(format_metrics_table({f"{args.model} on {data.name} ({args.split}, {masked})": {**metrics, "users": len(examples)}}))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"model": args.model, "dataset": data.name, "split": args.split,
                                                       "users": len(examples), "processes": processes,
                                                       "history_excluded": masked == "seen items excluded",
                                                       **metrics}, indent=2))
    if args.update_card:
        card = Path(args.model) / "README.md"
        if not card.is_file():
            raise CLIError(f"--update-card needs a local model directory with a README.md; {card} does not exist.")
        from .modelcard import update_card_eval_results

        update_card_eval_results(card, {data.name: {k: v for k, v in metrics.items() if "@" in k and not k.endswith("_se")}},
                                 split=args.split)
        print(f"Updated the model-index of {card}")
    return metrics


def _history_excluded(train: Any, exclude_history: bool | None) -> bool:
    from .recsys.history import history_exclusions

    return history_exclusions(train, [], exclude_history) is not None


# ---------------------------------------------------------------------------------------------- train
def run_train(args: argparse.Namespace) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_odllm  # noqa: F401

    from .configuration import ODLLMConfig
    from .recsys import (
        INDEX_FILE, InstructionEncoder, ItemIndex, build_instruction_samples, build_item_index, build_offline_model,
        build_offline_tokenizer, leave_one_out, load_base_model, train_recommender,
    )
    from .compressor import ODLLMCompressor
    from .recovery import apply_lora_to_factors, lowrank_modules, mark_factors_trainable, merge_lora, sample_calibration
    from .saving import staged_directory

    torch.manual_seed(args.seed)
    data = load_rec_dataset(args.dataset, args.data_path, args.items)
    split = leave_one_out(data.sequences, history=args.history)
    logger.info(f"{data.name}: {data.n_users} users, {data.n_items} items, {data.n_interactions} interactions")
    model_dir = Path(args.model) if args.model else None
    if model_dir is not None and (model_dir / INDEX_FILE).is_file():
        index = ItemIndex.load(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        if index.item_ids and list(index.item_ids) != list(data.item_ids):
            raise CLIError(f"{model_dir}/{INDEX_FILE} was built for another item catalogue than --dataset {args.dataset}.")
    else:
        index = build_item_index(data.item_text, data.item_ids, levels=args.levels, codebook_size=args.codebook_size,
                                 steps=args.index_steps, seed=args.seed, backend=args.item_embeddings,
                                 sequences=split.train.values())
        if args.model:
            model, tokenizer = load_base_model(args.model, index)
        else:
            tokenizer = build_offline_tokenizer(data.item_text, index)
            model = build_offline_model(tokenizer, hidden_size=args.hidden_size, num_layers=args.layers,
                                        num_heads=args.heads, seed=args.seed)
    encoder = InstructionEncoder(tokenizer, index, data.item_text)
    packed = args.model is None or (model_dir is not None and (model_dir / INDEX_FILE).is_file())
    samples = build_instruction_samples(encoder, split.train, tasks=args.tasks, history=args.history, packed=packed,
                                        short=packed, seed=args.seed)
    compressed = bool(lowrank_modules(model))
    if args.factor_bits is not None and not compressed and args.compress_ratio is None:
        raise CLIError("--factor-bits needs an OD-LLM-compressed --model (its recovered factors are rounded) or "
                       "--compress-ratio (compress at the end with integer factors).")
    if args.lora and not compressed:
        raise CLIError("--lora is for recovery fine-tuning of an OD-LLM-compressed --model; this model has no factors.")
    if compressed:
        if args.compress_ratio is not None:
            raise CLIError("--compress-ratio needs a dense model: this one is already OD-LLM-compressed.")
        if args.lora:
            model = apply_lora_to_factors(model, r=args.lora_r)
        else:
            mark_factors_trainable(model, train_others=args.train_all)
    probe = sample_calibration(samples, 64, args.seed)
    before = _mean_loss(model, tokenizer, probe) if compressed else None
    logger.info(f"Training on {len(samples)} samples ({'recovery of a compressed model' if compressed else 'dense'})")
    model = train_recommender(model, tokenizer, samples, Path(args.output) / "trainer", epochs=args.epochs,
                              learning_rate=args.lr, batch_size=args.batch_size, seed=args.seed, max_steps=args.max_steps)
    model = merge_lora(model)
    model.eval()
    if compressed:
        after = _mean_loss(model, tokenizer, probe)
        print(f"Recovery fine-tuning: training-sample loss {before:.4f} -> {after:.4f}")
        if after > before:
            logger.warning(
                "Recovery fine-tuning made the training loss worse. Low-rank factors fitted on little calibration "
                "data can be ill-conditioned off the calibration distribution (look for a huge grad_norm in the "
                "first logs): lower --lr, use --lora, or compress again with more/more varied calibration data."
            )
        if args.factor_bits is not None:
            from .quantization import quantize_factors

            quantize_factors(model, args.factor_bits, args.factor_group_size)
            logger.info(f"Rounded the recovered factors to int{args.factor_bits} (RTN).")
    output = Path(args.output) / "model"
    with tempfile.TemporaryDirectory() as tmp_index:
        index_file = index.save(tmp_index)
        if args.compress_ratio is not None:
            config = ODLLMConfig(ratio=args.compress_ratio, rank_multiple=args.rank_multiple,
                                 num_calibration_samples=args.calibration_samples, min_calibration_tokens=16,
                                 factor_bits=args.factor_bits, factor_group_size=args.factor_group_size)
            compressor = ODLLMCompressor(model, config=config, tokenizer=tokenizer)
            compressor.compress(sample_calibration(samples, args.calibration_samples, args.seed))
            compressor.calibration_source = f"{data.name} training samples ({compressor.report.num_calibration_samples} sampled)"
            compressor.artifacts[INDEX_FILE] = Path(index_file)
            compressor.save_pretrained(output)
        else:
            with staged_directory(output, protected=[args.model]) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                shutil.copyfile(index_file, tmp / INDEX_FILE)
    print(f"Saved the trained recommender to {output}")
    if args.push_to_hub:
        from .hub import push_folder_to_hub

        info = push_folder_to_hub(output, args.push_to_hub, private=args.private or None, revision=args.revision,
                                  token=args.token, commit_message="Upload recommender trained with optimum-odllm")
        print(f"Pushed to {getattr(info, 'commit_url', args.push_to_hub)}")
    return output


def _mean_loss(model, tokenizer, sequences: list[list[int]]) -> float:
    """Mean next-token loss on a few training sequences (a cheap check that recovery helped)."""
    import torch

    from .recsys.training import PadCollator

    was_training = model.training
    model.eval()
    batch = PadCollator(tokenizer.pad_token_id)([{"input_ids": s, "labels": s} for s in sequences])
    device = next(model.parameters()).device
    with torch.no_grad():
        loss = float(model(**{k: v.to(device) for k, v in batch.items()}).loss)
    model.train(was_training)
    return loss


COMMANDS = {"compress": run_compress, "evaluate": run_evaluate, "train": run_train, "export": run_export}


def run_command(name: str, args: argparse.Namespace) -> Any:
    """Run one subcommand; user errors print one ``error: ...`` line and exit with status 2 (as argparse does).

    Value and environment errors (bad settings, missing paths, wrong devices, incompatible models) are user
    errors; anything else is a bug and keeps its traceback.
    """
    _setup_logging()
    try:
        return COMMANDS[name](args)
    except CLIError as err:
        print(f"error: {err.message}", file=sys.stderr)
        raise
    except (ValueError, OSError, FloatingPointError, ImportError) as err:
        print(f"error: {err}".replace("\n", " "), file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        _release_process_group()


def _release_process_group() -> None:
    """Under ``accelerate launch``, tear the process group down before exit (gloo aborts on live threads)."""
    distributed = sys.modules.get("torch.distributed")  # never imports torch just for this
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``optimum-odllm`` (same commands as ``optimum-cli odllm``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_usage(sys.stderr)
        parser.exit(2, f"{parser.prog}: error: choose a command: {', '.join(COMMANDS)}\n")
    run_command(args.command, args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
