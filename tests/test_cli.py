"""CLI: `optimum-cli odllm compress|evaluate|train` end to end on a tiny model and a tiny interaction table."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from conftest import random_sentences
from hub_helpers import make_base_dir

from optimum_odllm.cli import main
from optimum_odllm.cli_options import build_parser

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = ["--rank-multiple", "8", "--num-samples", "16", "--min-calibration-tokens", "16"]


def _optimum_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))  # the register module, before/without `pip install -e .`
    cli = Path(sys.executable).with_name("optimum-cli")
    return subprocess.run([str(cli), *args], capture_output=True, text=True, env=env, timeout=120)


def test_optimum_cli_registers_odllm_with_help():
    out = _optimum_cli("odllm", "--help")
    assert out.returncode == 0, out.stderr
    assert all(cmd in out.stdout for cmd in ("compress", "evaluate", "train"))
    out = _optimum_cli("odllm", "compress", "--help")
    assert out.returncode == 0, out.stderr
    for option in ("--ratio", "--calibration", "--output", "--device", "--push-to-hub", "--no-whitening"):
        assert option in out.stdout


def test_every_option_is_documented():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        for action in command._actions:
            assert action.help and len(action.help) > 10, (name, action.dest)


def test_compress_from_text_file(tmp_path, capsys):
    base = make_base_dir(tmp_path)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(random_sentences(16, 20)) + "\n\n")
    out = tmp_path / "out"
    assert main(["compress", str(base), "-o", str(out), "--ratio", "0.5", "--calibration", str(calib), "--device", "cpu", *TINY]) == 0
    assert "Compressed" in capsys.readouterr().out
    card = ModelCard.load(out / "README.md")
    assert "text file calib.txt (16 lines)" in card.text and card.data.license == "mit"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["ratio"] == 0.5
    assert (out / "item_index.json").is_file() and (out / "tokenizer.json").is_file()


def test_compress_with_block_refinement_flags(tmp_path, capsys):
    base = make_base_dir(tmp_path)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(random_sentences(16, 20)) + "\n")
    out = tmp_path / "out"
    argv = ["compress", str(base), "-o", str(out), "--calibration", str(calib), "--device", "cpu", *TINY]
    assert main([*argv, "--refine-steps", "4", "--refine-lr", "0.001"]) == 0
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["refine_steps"] == 4 and saved["refine_lr"] == 0.001
    assert "| `refine_steps` | `4` |" in (out / "README.md").read_text()
    with pytest.raises(SystemExit):
        main([*argv, "-o", str(tmp_path / "out2"), "--refine-steps", "-1"])
    assert "refine_steps must be None (the default) or an integer >= 0" in capsys.readouterr().err


def test_compress_from_jsonl_dataset_and_errors(tmp_path, capsys):
    base = make_base_dir(tmp_path)
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"body": s}) for s in random_sentences(16, 20)))
    out = tmp_path / "out"
    main(["compress", str(base), "-o", str(out), "--calibration", str(data), "--text-column", "body", "--no-progressive", *TINY])
    assert "file calib.jsonl, 16 sequences" in ModelCard.load(out / "README.md").text
    with pytest.raises(SystemExit):
        main(["compress", str(base), "-o", str(out), "--calibration", "none", *TINY])
    assert "--no-whitening --no-progressive" in capsys.readouterr().err


def _interactions(root: Path, users: int = 24, items: int = 16) -> tuple[Path, Path]:
    rng = random.Random(0)
    inter, meta = root / "inter.csv", root / "items.csv"
    with open(inter, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        for u in range(users):
            start = rng.randrange(items)
            for t in range(6):  # users walk the catalogue in order: learnable next-item structure
                w.writerow([f"u{u}", f"i{(start + t) % items}", t])
    with open(meta, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title"])
        for i in range(items):
            w.writerow([f"i{i}", f"movie number {i} genre {i % 3}"])
    return inter, meta


@pytest.mark.slow
def test_train_evaluate_compress_recover_end_to_end(tmp_path, capsys, monkeypatch):
    inter, meta = _interactions(tmp_path)
    data = ["--dataset", str(inter), "--items", str(meta)]
    main(["train", *data, "-o", str(tmp_path / "dense"), "--hidden-size", "32", "--layers", "2", "--heads", "2",
          "--levels", "2", "--codebook-size", "4", "--index-steps", "30", "--item-embeddings", "hybrid", "--epochs", "2", "--batch-size", "16"])
    dense = tmp_path / "dense" / "model"
    assert (dense / "item_index.json").is_file()

    main(["evaluate", str(dense), *data, "--max-users", "8", "--beams", "5", "--output-json", str(tmp_path / "m.json")])
    table = capsys.readouterr().out
    assert "| model | users | HR@1 | HR@5 | HR@10 | NDCG@5 | NDCG@10 |" in table
    assert set(json.loads((tmp_path / "m.json").read_text())) >= {"HR@10", "NDCG@10", "users"}

    comp = tmp_path / "comp"
    main(["compress", str(dense), "-o", str(comp), "--ratio", "0.5", "--calibration", "recsys", *data, *TINY])
    assert "training sequences (recsys" in ModelCard.load(comp / "README.md").text

    main(["evaluate", str(comp), *data, "--max-users", "8", "--beams", "5", "--update-card",
          "--output-json", str(tmp_path / "eager.json")])
    card = ModelCard.load(comp / "README.md")
    assert {r.metric_name for r in card.data.eval_results} == {"HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10"}

    # --compile hands the loaded model to compile_for_search (the compiled search itself is tested in
    # test_recsys_core; compiling here would take minutes)
    compiled = []
    monkeypatch.setattr("optimum_odllm.recsys.compile_for_search", lambda model: compiled.append(type(model).__name__) or model)
    main(["evaluate", str(comp), *data, "--max-users", "8", "--beams", "5", "--compile",
          "--output-json", str(tmp_path / "compiled.json")])
    monkeypatch.undo()
    assert compiled == ["LlamaForCausalLM"]
    assert json.loads((tmp_path / "compiled.json").read_text()) == json.loads((tmp_path / "eager.json").read_text())

    main(["train", *data, "--model", str(comp), "-o", str(tmp_path / "rec"), "--lora", "--lora-r", "2",
          "--max-steps", "2", "--batch-size", "8"])
    recovered = tmp_path / "rec" / "model"
    config = json.loads((recovered / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "odllm" and (recovered / "item_index.json").is_file()

    # recovery, then the recovered factors rounded to int8: a quantized checkpoint that loads
    main(["train", *data, "--model", str(comp), "-o", str(tmp_path / "rec8"), "--max-steps", "2", "--batch-size", "8",
          "--factor-bits", "8"])
    rec8 = tmp_path / "rec8" / "model"
    q = json.loads((rec8 / "config.json").read_text())["quantization_config"]
    assert (q["factor_bits"], q["factor_quantizer"]) == (8, "rtn")
    from optimum_odllm.quantization import QuantizedLowRankLinear

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(rec8)
    assert any(isinstance(m, QuantizedLowRankLinear) for m in loaded.modules())
    with pytest.raises(SystemExit):  # a dense model has no factors to round
        main(["train", *data, "--model", str(dense), "-o", str(tmp_path / "bad"), "--max-steps", "1",
              "--factor-bits", "8"])
    assert "--factor-bits needs an OD-LLM-compressed" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()

    main(["train", *data, "--model", str(dense), "-o", str(tmp_path / "cat"), "--max-steps", "2", "--batch-size", "8",
          "--compress-ratio", "0.5", "--calibration-samples", "16"])
    assert (tmp_path / "cat" / "model" / "README.md").is_file()
    assert json.loads((tmp_path / "cat" / "model" / "config.json").read_text())["quantization_config"]["ratio"] == 0.5
