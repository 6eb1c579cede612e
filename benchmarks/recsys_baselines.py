"""GPTQ 4-bit and SparseGPT 50% of the ML-100K recommender, each in the venv of its library.

Not run by hand normally: ``quality_vs_size.py`` and ``recsys_speed.py`` call it with the right
interpreter (see ``run_baselines.sh`` for how the venvs are built, with pinned versions).

    # gptqmodel 7.6.0 (real int4 CPU kernel; transformers 5.23 like the main venv)
    GPTQMODEL_CPU_WORKERS=2 /tmp/venv-gptqm/bin/python benchmarks/recsys_baselines.py gptq \
        --model-dir runs/ml100k/dense --calibration CAL.json --out-dir runs/baselines/gptq-w4
    GPTQMODEL_CPU_WORKERS=2 /tmp/venv-gptqm/bin/python benchmarks/recsys_baselines.py eval-gptq \
        --model-dir runs/baselines/gptq-w4 --max-eval-users 300 --json OUT.json
    # llmcompressor 0.14.0.1 (pins transformers<=5.17): SparseGPT 50% unstructured, saved dense (uncompressed)
    /tmp/venv-baselines/bin/python benchmarks/recsys_baselines.py sparsegpt \
        --model-dir runs/ml100k/dense --calibration CAL.json --out-dir runs/baselines/sparsegpt-50

``CAL.json`` is a list of token-id lists (the same calibration sequences as OD-LLM gets).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))


def copy_extras(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.name == "item_index.json" or f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy2(f, dst / f.name)


def gptq(args) -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    ids = json.loads(Path(args.calibration).read_text())
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    qcfg = QuantizeConfig(bits=4, group_size=args.group_size, sym=False, desc_act=False, damp_percent=0.01)
    t = time.perf_counter()
    model = GPTQModel.load(args.model_dir, qcfg, device="cpu")
    model.quantize([{"input_ids": r, "attention_mask": [1] * len(r)} for r in ids], tokenizer=tok)
    seconds = time.perf_counter() - t
    out = Path(args.out_dir)
    model.save(str(out))
    copy_extras(Path(args.model_dir), out)
    (out / "bench_info.json").write_text(json.dumps({"method": "gptq-w4", "library": "gptqmodel", "quantize_s": seconds,
                                                      "group_size": args.group_size, "sym": False}))
    print(json.dumps({"quantize_s": seconds, "out": str(out)}))


def load_gptq(model_dir: str):
    """gptqmodel checkpoint with the gptq_torch_aten backend (aten._weight_int4pack_mm_for_cpu, bf16 activations)."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import BACKEND, GPTQModel

    return GPTQModel.load(model_dir, device="cpu", backend=BACKEND("gptq_torch_aten")).model.eval()


def eval_gptq(args) -> None:
    import recsys_common as rc
    from optimum_odllm.recsys import InstructionEncoder, ItemIndex
    from transformers import AutoTokenizer

    data, split = rc.load_split(args.data_path)
    model = load_gptq(args.model_dir)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    encoder = InstructionEncoder(tok, ItemIndex.load(args.model_dir), data.item_text)
    users = rc.eval_users(split, args.max_eval_users, args.seed)
    t = time.perf_counter()
    metrics = rc.evaluate(model, encoder, users, beams=args.beams)
    row = {**metrics, "eval_s": time.perf_counter() - t, "eval_users": len(users),
           "qlinear": type(model.model.layers[0].mlp.down_proj).__name__, "dtype": str(next(model.parameters()).dtype)}
    Path(args.json).write_text(json.dumps(row))
    print(json.dumps(row))


def sparsegpt(args) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = json.loads(Path(args.calibration).read_text())
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    calib = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    recipe = SparseGPTModifier(sparsity=args.sparsity, mask_structure="0:0", targets=["Linear"], ignore=["re:.*lm_head"])
    t = time.perf_counter()
    model = oneshot(model=model, dataset=calib, recipe=recipe, tokenizer=tok, num_calibration_samples=len(ids),
                    max_seq_length=max(len(r) for r in ids))
    seconds = time.perf_counter() - t
    layers = model.model.layers
    zeros = sum(int((m.weight == 0).sum()) for m in layers.modules() if isinstance(m, torch.nn.Linear))
    total = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    out = Path(args.out_dir)
    model.save_pretrained(str(out), save_compressed=False)
    copy_extras(Path(args.model_dir), out)
    info = {"method": f"sparsegpt-{int(args.sparsity * 100)}", "library": "llmcompressor", "prune_s": seconds,
            "decoder_zero_fraction": zeros / total}
    (out / "bench_info.json").write_text(json.dumps(info))
    print(json.dumps(info))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["gptq", "eval-gptq", "sparsegpt"])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--calibration")
    p.add_argument("--out-dir")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--data-path", default=None)
    p.add_argument("--max-eval-users", type=int, default=None)
    p.add_argument("--beams", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="/dev/stdout")
    args = p.parse_args()
    {"gptq": gptq, "eval-gptq": eval_gptq, "sparsegpt": sparsegpt}[args.what](args)


if __name__ == "__main__":
    main()
