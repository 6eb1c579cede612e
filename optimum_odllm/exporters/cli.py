"""``optimum-cli odllm export onnx|executorch MODEL -o DIR``: argument definitions and the command.

Module level is standard library only (``optimum-cli`` builds every plugin's parser on each call);
torch, transformers and the runtimes are imported only when :func:`run_export` runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

EXPORT_HELP = "Export a compressed (or dense) model to a device runtime: ONNX Runtime or ExecuTorch (XNNPACK)."
RUNTIME_HELP = {
    "onnx": "ONNX graph with KV-cache inputs/outputs (model.onnx), low-rank factors kept as two MatMuls; "
    "run it with ONNX Runtime (optimum_odllm.exporters.OrtCausalLM). Needs `pip install \"optimum-odllm[export]\"`.",
    "executorch": "ExecuTorch program (model.pte) delegated to XNNPACK, KV-cache inputs/outputs, factors kept; "
    "run it with ExecuTorch's runtime. Needs `pip install \"optimum-odllm[executorch]\"`.",
}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="directory of a compressed model (`optimum-cli odllm compress -o DIR`) or a dense one.")
    parser.add_argument("-o", "--output", required=True, help="directory to write the exported model, config, "
                        "tokenizer and item_index.json (if the model directory has one) to.")
    parser.add_argument("--dequantize", action="store_true", help="merge every up @ down back into one dense "
                        "weight before exporting (for runtimes or comparisons that need dense projections).")
    parser.add_argument("--all-logits", action="store_true", help="return logits for every position (default: "
                        "the last one only, which is what generation and the recommender's beam search read).")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Give an ``export`` parser its ``onnx``/``executorch`` subcommands (``cli_options.ADDERS["export"]``)."""
    runtimes = parser.add_subparsers(dest="runtime", metavar="{onnx,executorch}", required=True,
                                     help="the runtime to export for: onnx (ONNX Runtime) or executorch (XNNPACK).")
    onnx = runtimes.add_parser("onnx", help=RUNTIME_HELP["onnx"], description=RUNTIME_HELP["onnx"])
    _add_common(onnx)
    onnx.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's, 18 or newer).")
    et = runtimes.add_parser("executorch", help=RUNTIME_HELP["executorch"], description=RUNTIME_HELP["executorch"])
    _add_common(et)
    et.add_argument("--max-batch", type=int, default=32, help="largest batch the program accepts; the beam "
                    "search's decode batch is users x beams (default: 32).")
    et.add_argument("--max-seq-len", type=int, default=None, help="largest prompt + generated length "
                    "(default: the model's max_position_embeddings, at most 512).")


def run_export(args: argparse.Namespace) -> Path:
    """Export ``args.model`` to ``args.output`` for ``args.runtime``; prints and returns the written file."""
    if args.runtime == "onnx":
        from .onnx import export_onnx

        path = export_onnx(args.model, args.output, opset=args.opset, dequantize=args.dequantize,
                           all_logits=args.all_logits)
    elif args.runtime == "executorch":
        from .executorch import export_executorch

        path = export_executorch(args.model, args.output, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                                 dequantize=args.dequantize, all_logits=args.all_logits)
    else:
        raise ValueError(f"unknown runtime {args.runtime!r}: use onnx or executorch")
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)")
    return path
