"""Argument definitions of ``optimum-cli odllm compress|evaluate|train`` (standard library only).

Kept free of torch/transformers imports on purpose: ``optimum-cli`` builds the parsers of every
registered plugin on each invocation, so this module must import in milliseconds. The work itself
lives in :mod:`optimum_odllm.cli`, imported only when a command runs.
"""

from __future__ import annotations

import argparse

try:
    from .exporters.cli import EXPORT_HELP, add_export_arguments
    from .settings import SETTINGS
except ImportError:  # executed standalone by optimum-cli's register module (the package is not imported)
    import importlib.util as _util
    import sys as _sys
    from pathlib import Path as _Path

    def _load(name: str, relative: str):
        spec = _util.spec_from_file_location(name, _Path(__file__).parent / relative)
        module = _util.module_from_spec(spec)
        _sys.modules[name] = module  # dataclasses resolve the module by name
        spec.loader.exec_module(module)
        return module

    SETTINGS = _load("_optimum_odllm_settings", "settings.py").SETTINGS
    _export_cli = _load("_optimum_odllm_export_cli", "exporters/cli.py")
    EXPORT_HELP, add_export_arguments = _export_cli.EXPORT_HELP, _export_cli.add_export_arguments

COMMAND_HELP = {
    "odllm": "OD-LLM: compress, evaluate and train LLM-based sequential recommenders (optimum-odllm).",
    "compress": "Compress a causal LM / recommender with OD-LLM (whitened SVD + progressive alignment) and save it.",
    "evaluate": "Evaluate a (compressed) recommender: HR@1/5/10 and NDCG@5/10 with constrained beam search.",
    "train": "Train a recommender, or recovery-fine-tune a compressed one (full factors or LoRA), optionally "
    "compressing at the end.",
    "export": EXPORT_HELP,
}

DATASET_HELP = (
    "interaction data: 'ml-100k' (MovieLens-100K from the recbole wheel or --data-path), a CSV/TSV/JSON(L)/Parquet "
    "interaction table (columns user_id,item_id,timestamp; item text from --items), or 'amazon:REVIEWS.json[.gz]' "
    "(item text from --items META.json[.gz])"
)


def _add_dataset_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group("recommendation data")
    group.add_argument("--dataset", required=required, default=None, help=DATASET_HELP + ".")
    group.add_argument(
        "--data-path", default=None,
        help="for --dataset ml-100k: directory (or recbole .whl) holding ml-100k.inter/ml-100k.item "
        "(default: the installed recbole package).",
    )
    group.add_argument(
        "--items", default=None,
        help="item table (CSV/JSON/Parquet with item_id and title columns) or Amazon metadata file giving item text.",
    )
    group.add_argument(
        "--history", type=int, default=20,
        help="items of history per user kept in prompts (default: 20, as LC-Rec).",
    )


def _add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Hugging Face Hub")
    group.add_argument(
        "--push-to-hub", metavar="REPO_ID", default=None,
        help="also upload the result (model, tokenizer, item index, model card) to this Hub repo in one commit.",
    )
    group.add_argument("--private", action="store_true", help="create the Hub repo as private (if it does not exist).")
    group.add_argument("--revision", default=None, help="Hub branch to commit to (created if missing).")
    group.add_argument("--token", default=None, help="Hub token (default: the one stored by `hf auth login`).")


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per ``ODLLMConfig`` setting, generated from :data:`optimum_odllm.settings.SETTINGS`."""
    group = parser.add_argument_group("OD-LLM settings (ODLLMConfig fields)")
    for setting in SETTINGS:
        flags = [setting.flag, *setting.aliases]
        shown = "none" if setting.default is None else " ".join(setting.default) if isinstance(setting.default, list) else setting.default
        help_text = f"{setting.help} (default: {shown})."
        if setting.kind == "bool":
            group.add_argument(*flags, dest=setting.name, action=argparse.BooleanOptionalAction, default=setting.default, help=help_text)
        elif setting.kind == "names":
            group.add_argument(*flags, dest=setting.name, nargs="+", default=setting.default, metavar="NAME", help=help_text)
        elif setting.kind == "choice":
            choices = [c for c in setting.choices if c is not None]
            group.add_argument(*flags, dest=setting.name, choices=choices, type=type(choices[0]),
                               default=setting.default, help=help_text)
        else:
            kind = {"fraction": float, "damping": float, "rate": float, "int": int, "steps": int}.get(setting.kind, str)
            group.add_argument(*flags, dest=setting.name, type=kind, default=setting.default, help=help_text)


def add_compress_arguments(parser: argparse.ArgumentParser) -> None:
    """``compress MODEL --ratio R --calibration SRC --output DIR`` plus every ``ODLLMConfig`` setting."""
    parser.add_argument("model", help="Hub model id or local directory of the dense causal LM / recommender to compress.")
    parser.add_argument(
        "-o", "--output", required=True,
        help="directory to write the compressed checkpoint into (created if needed; files already there that the "
        "save does not write are kept; the model's own directory is refused).",
    )
    parser.add_argument(
        "--calibration", default="recsys",
        help="calibration data: 'recsys' (the recommender's training sequences, from --dataset and the model's "
        "item_index.json; default), a .txt file (one sequence per line), a CSV/JSON(L)/Parquet file or a "
        "datasets.save_to_disk directory (column --text-column or input_ids), a Hub dataset name "
        "(with --dataset-config/--dataset-split), or 'none' (data-free plain SVD, needs --no-whitening "
        "--no-progressive).",
    )
    parser.add_argument("--text-column", default="text", help="text column of a calibration table/dataset (default: text).")
    parser.add_argument("--dataset-config", default=None, help="config name of a Hub calibration dataset.")
    parser.add_argument("--dataset-split", default="train", help="split of a Hub/local calibration dataset (default: train).")
    add_setting_arguments(parser)
    parser.add_argument(
        "--device", default=None,
        help="device each layer is processed on, e.g. cuda or cpu (default: cuda if available).",
    )
    parser.add_argument(
        "--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype to load the model in (default: the checkpoint's).",
    )
    parser.add_argument(
        "--resume", action="store_true",
        help="checkpoint every finished layer into OUTPUT/.odllm_checkpoint and continue from it if a previous run "
        "with the same settings, data and model was interrupted (the result is bit-identical).",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration sample (default: 0).")
    _add_dataset_arguments(parser, required=False)
    _add_hub_arguments(parser)


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """``evaluate MODEL --dataset DATA``: prints the HR@K/NDCG@K table."""
    parser.add_argument(
        "model",
        help="Hub id or directory of a (compressed or dense) recommender; needs tokenizer files and item_index.json.",
    )
    _add_dataset_arguments(parser, required=True)
    parser.add_argument("--split", choices=["test", "valid"], default="test", help="leave-one-out split (default: test).")
    parser.add_argument("--max-users", type=int, default=None, help="evaluate only the first N users (quick checks).")
    parser.add_argument("--beams", type=int, default=20, help="constrained beam-search width = ranking length (default: 20).")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per beam-search batch (default: 32).")
    parser.add_argument(
        "--exclude-history", action=argparse.BooleanOptionalAction, default=None,
        help="exclude each user's already-seen items inside the beam search (default: on when no user has a "
             "repeated item, as on MovieLens; --no-exclude-history gives the unmasked numbers).",
    )
    parser.add_argument(
        "--template", choices=["packed", "seqrec"], default="packed",
        help="prompt format the model was trained with: 'packed' (history : <items>, this package's offline "
        "recipe) or 'seqrec' (LC-Rec instruction). Default: packed.",
    )
    parser.add_argument("--device", default=None, help="device to run on (default: cuda if available, else cpu).")
    parser.add_argument(
        "--compile", action="store_true",
        help="compile the model's forward for the beam search (torch.compile, Inductor; needs a C++ compiler on "
             "CPU). The first batch compiles (9-87 s for the ML-100K recommenders on a 2-core CPU, paid back after "
             "about 4,000-17,000 ranked users): same rankings, for long runs.",
    )
    parser.add_argument("--output-json", default=None, help="also write the metrics to this JSON file.")
    parser.add_argument(
        "--update-card", action="store_true",
        help="write the metrics into MODEL/README.md as model-index metadata (local directories only).",
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """``train --dataset DATA --output DIR [--model M] [--lora] [--compress-ratio R]``."""
    _add_dataset_arguments(parser, required=True)
    parser.add_argument("-o", "--output", required=True, help="directory to save the trained model, tokenizer and item index.")
    parser.add_argument(
        "--model", default=None,
        help="starting point: a recommender directory with item_index.json (continue training; an OD-LLM-compressed "
        "one gets recovery fine-tuning of its factors), a Hub id/path of a base causal LM (index tokens are added), "
        "or nothing: a small Llama built offline with a word-level tokenizer.",
    )
    parser.add_argument("--epochs", type=float, default=1.0, help="training epochs (default: 1).")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (default: no limit).")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, cosine schedule (default: 1e-3).")
    parser.add_argument("--batch-size", type=int, default=32, help="per-device batch size (default: 32).")
    parser.add_argument("--tasks", nargs="+", default=["seqrec", "item2index"],
                        help="LC-Rec tasks to train on: seqrec item2index index2item (default: seqrec item2index).")
    parser.add_argument("--hidden-size", type=int, default=128, help="offline model: hidden size (default: 128).")
    parser.add_argument("--layers", type=int, default=2, help="offline model: decoder layers (default: 2).")
    parser.add_argument("--heads", type=int, default=4, help="offline model: attention heads (default: 4).")
    parser.add_argument("--levels", type=int, default=3, help="new item index: RQ-VAE levels (default: 3).")
    parser.add_argument("--codebook-size", type=int, default=64, help="new item index: codes per level (default: 64).")
    parser.add_argument("--index-steps", type=int, default=1500, help="new item index: RQ-VAE training steps (default: 1500).")
    parser.add_argument("--item-embeddings", default="collaborative", choices=["offline", "collaborative", "hybrid"],
                        help="new item index: build the semantic IDs from item text (offline), from the items' "
                             "co-occurrence in the training sequences (collaborative), or both (default: collaborative).")
    group = parser.add_argument_group("recovery fine-tuning of a compressed model")
    group.add_argument(
        "--lora", action="store_true",
        help="train LoRA adapters (peft) on the low-rank factors instead of the factors themselves; merged before saving.",
    )
    group.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default: 8).")
    group.add_argument(
        "--train-all", action="store_true",
        help="also train non-factor weights (embeddings, norms, head) of a compressed model; default trains factors only.",
    )
    group.add_argument(
        "--factor-bits", type=int, choices=[8, 4], default=None,
        help="store the factors as int8/int4 codes after training: a compressed --model's recovered factors are "
        "rounded (RTN, quantize_factors); with --compress-ratio the compression quantizes them (GPTQ).",
    )
    group.add_argument("--factor-group-size", type=int, default=128, help="int4 group size for --factor-bits (default: 128).")
    group = parser.add_argument_group("compress at the end of training")
    group.add_argument(
        "--compress-ratio", type=float, default=None,
        help="after training, compress with OD-LLM at this ratio (calibration: training sequences) and save that.",
    )
    group.add_argument("--rank-multiple", type=int, default=8, help="rank multiple for --compress-ratio (default: 8).")
    group.add_argument("--calibration-samples", type=int, default=256, help="calibration sequences for --compress-ratio.")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0).")
    _add_hub_arguments(parser)


ADDERS = {"compress": add_compress_arguments, "evaluate": add_evaluate_arguments, "train": add_train_arguments,
          "export": add_export_arguments}


def build_parser(prog: str = "optimum-odllm") -> argparse.ArgumentParser:
    """The console-script parser: ``optimum-odllm compress|evaluate|train ...``."""
    parser = argparse.ArgumentParser(prog=prog, description=COMMAND_HELP["odllm"])
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(ADDERS) + "}")
    for name, add in ADDERS.items():
        add(sub.add_parser(name, help=COMMAND_HELP[name], description=COMMAND_HELP[name]))
    return parser
