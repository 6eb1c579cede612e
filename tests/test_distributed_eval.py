"""Under ``accelerate launch`` (2 CPU processes, gloo): evaluation (library and ``optimum-cli odllm evaluate``)
equals the single-process one exactly, and the ``Trainer`` recipe trains with DDP (data split, replicas in sync,
response-only labels, index tokens).

This file is also the worker script: ``accelerate launch ... tests/test_distributed_eval.py WORKDIR eval|train|cli``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optimum_odllm.recsys import PACKED_SEQREC_TEMPLATE, Example, InstructionEncoder, ItemIndex
from optimum_odllm.recsys import evaluation
from optimum_odllm.recsys.metrics import summarize
from optimum_odllm.recsys.training import build_offline_model, build_offline_tokenizer

N_ITEMS, N_USERS, BATCH, BEAMS = 40, 26, 4, 8
TRAIN_BATCH = 8


def make_task(workdir: Path) -> None:
    """A random tiny recommender (saved like a trained one) and synthetic users with varied history lengths."""
    rng = random.Random(0)
    index = ItemIndex(codes=[(a, b, c) for a in range(4) for b in range(4) for c in range(3)][:N_ITEMS])
    texts = [f"item {k} genre {k % 5}" for k in range(N_ITEMS)]
    tokenizer = build_offline_tokenizer(texts, index)
    model = build_offline_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    index.save(workdir / "model")
    train, examples = {}, []
    for u in range(N_USERS):
        seq = rng.sample(range(N_ITEMS), rng.randint(4, 9))  # no repeats: history exclusion is on by default
        train[str(u)] = seq[:-2]
        examples.append([str(u), seq[-7:-1], seq[-1]])
    (workdir / "task.json").write_text(json.dumps({"texts": texts, "train": train, "examples": examples}))


def load_task(workdir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = json.loads((workdir / "task.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(workdir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    encoder = InstructionEncoder(tokenizer, ItemIndex.load(workdir / "model"), task["texts"])
    examples = [Example(u, tuple(h), t) for u, h, t in task["examples"]]
    return model, encoder, examples, task["train"]


def evaluate_both(model, encoder, examples, train) -> dict[str, dict[str, list[float]]]:
    run = lambda mask: evaluation.evaluate_per_user(model, encoder, examples, PACKED_SEQREC_TEMPLATE,  # noqa: E731
                                                    num_beams=BEAMS, batch_size=BATCH, progress=False, train=train,
                                                    exclude_history=mask)
    return {"masked": run(None), "unmasked": run(False)}


def worker(workdir: Path) -> None:
    """Run under ``accelerate launch``: every rank records the users it ranked and the gathered results."""
    from optimum_odllm.recsys.distributed import check_same_across_processes, launched_state

    torch.set_num_threads(1)
    state = launched_state()
    ranked_here: list[int] = []
    inner = evaluation._rank_batches

    def recording(model, prompts, batches, *args, **kwargs):
        ranked_here.extend(k for b in batches for k in b)
        return inner(model, prompts, batches, *args, **kwargs)

    evaluation._rank_batches = recording
    results = evaluate_both(*load_task(workdir))
    check_same_across_processes("same everywhere", "a shared value")  # must pass
    try:
        check_same_across_processes(f"rank {state.process_index}", "a per-rank value")
        mismatch_detected = False
    except RuntimeError:
        mismatch_detected = True
    out = {"rank": state.process_index, "world": state.num_processes, "backend": str(state.backend),
           "ranked": ranked_here, "results": results, "mismatch_detected": mismatch_detected}
    (workdir / f"rank{state.process_index}.json").write_text(json.dumps(out))


def train_worker(workdir: Path) -> None:
    """Run under ``accelerate launch``: 1 epoch of the recipe; every rank records its steps, labels and weights."""
    from transformers import Trainer

    from optimum_odllm.recsys import build_instruction_samples, train_recommender
    from optimum_odllm.recsys.distributed import launched_state

    torch.set_num_threads(1)
    model, encoder, _, train = load_task(workdir)
    samples = build_instruction_samples(encoder, train, tasks=("seqrec",), history=6)
    labelled: list[list[int]] = []
    forward = model.forward

    @functools.wraps(forward)  # the Trainer keeps only the columns named in forward's signature
    def recording(*args, labels=None, **kwargs):
        labelled.extend([t for t in row if t != -100] for row in labels.tolist())
        return forward(*args, labels=labels, **kwargs)

    model.forward = recording
    steps: list[int] = []
    inner = Trainer.train

    def train_and_record(self, *args, **kwargs):
        out = inner(self, *args, **kwargs)
        steps.append(self.state.global_step)
        return out

    Trainer.train = train_and_record
    trained = train_recommender(model, encoder.tokenizer, samples, workdir / "trainer", epochs=1, batch_size=TRAIN_BATCH,
                                learning_rate=1e-2, logging_steps=1, disable_tqdm=True)
    state = launched_state()
    torch.save({k: v.detach().cpu() for k, v in trained.state_dict().items()}, workdir / f"weights{state.process_index}.pt")
    (workdir / f"train{state.process_index}.json").write_text(json.dumps(
        {"world": state.num_processes, "steps": steps, "samples": len(samples), "labelled": labelled,
         "vocab": trained.get_input_embeddings().weight.shape[0]}))


def make_cli_task(workdir: Path) -> list[str]:
    """A random tiny recommender for the interaction table of ``test_cli``; returns the CLI's data arguments."""
    from test_cli import _interactions

    from optimum_odllm.recsys import load_interactions_table

    inter, meta = _interactions(workdir, users=30, items=16)
    data = load_interactions_table(str(inter), items=str(meta))
    index = ItemIndex(codes=[(a, b) for a in range(4) for b in range(4)][: data.n_items], item_ids=data.item_ids)
    tokenizer = build_offline_tokenizer(data.item_text, index)
    model = build_offline_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    index.save(workdir / "model")
    return ["--dataset", str(inter), "--items", str(meta), "--beams", "6", "--batch-size", "4"]


def cli_worker(workdir: Path) -> None:
    """Run under ``accelerate launch``: the evaluate command, writing JSON from the main process only."""
    from optimum_odllm.cli import main

    torch.set_num_threads(1)
    args = json.loads((workdir / "cli_args.json").read_text())
    main(["evaluate", str(workdir / "model"), *args, "--output-json", str(workdir / "cli_launched.json")])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_cpu_processes(workdir: Path, mode: str) -> None:
    """``accelerate launch`` with 2 processes on this CPU-only host (``--multi_gpu`` picks the torchrun launcher;
    accelerate's state then selects gloo because no GPU is present)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           __file__, str(workdir), mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_two_process_evaluation_equals_single_process(tmp_path):
    make_task(tmp_path)
    launch_two_cpu_processes(tmp_path, "eval")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    # single-process reference, same thread count as the workers
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = evaluate_both(*load_task(tmp_path))
    finally:
        torch.set_num_threads(threads)

    assert [r["world"] for r in ranks] == [2, 2] and all(r["backend"] == "gloo" for r in ranks)
    assert all(r["mismatch_detected"] for r in ranks)  # repeated work that differs between processes is caught
    # the users were really split: each process ranked a non-empty, disjoint share, together all of them
    shares = [set(r["ranked"]) for r in ranks]
    per_run = 2  # evaluate_both runs masked and unmasked: each share is ranked twice
    assert all(len(r["ranked"]) == per_run * len(s) for r, s in zip(ranks, shares))
    assert all(shares) and not shares[0] & shares[1] and shares[0] | shares[1] == set(range(N_USERS))
    for r in ranks:  # every process gathered everything, and it equals the single-process run bit for bit
        assert r["results"] == reference
        for mode in ("masked", "unmasked"):
            assert summarize(r["results"][mode], with_stderr=True) == summarize(reference[mode], with_stderr=True)
    # the masked evaluation did mask: per-user values differ somewhere from the unmasked ones
    assert reference["masked"] != reference["unmasked"]


@pytest.mark.slow
def test_two_process_training_with_the_trainer_recipe(tmp_path):
    make_task(tmp_path)
    initial = {k: v.clone() for k, v in load_task(tmp_path)[0].state_dict().items()}
    launch_two_cpu_processes(tmp_path, "train")
    runs = [json.loads((tmp_path / f"train{r}.json").read_text()) for r in (0, 1)]
    weights = [torch.load(tmp_path / f"weights{r}.pt") for r in (0, 1)]
    model, encoder, _, _ = load_task(tmp_path)

    assert [r["world"] for r in runs] == [2, 2]
    # the batches were split: each process took half of them (single process: ceil(samples / batch) steps)
    batches = math.ceil(runs[0]["samples"] / TRAIN_BATCH)
    assert [r["steps"] for r in runs] == [[math.ceil(batches / 2)]] * 2
    # DDP kept the replicas identical, and training moved them
    assert weights[0].keys() == initial.keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in initial)
    assert any(not torch.equal(weights[0][k], initial[k]) for k in initial)
    # index tokens intact, and the loss saw only responses: the target's code tokens and </s>, nothing of the prompt
    codes = {tuple(ids) for ids in encoder.item_ids}
    assert all(r["vocab"] == len(encoder.tokenizer) for r in runs)
    for r in runs:
        assert r["labelled"]
        assert all(tuple(row[:-1]) in codes and row[-1] == encoder.tokenizer.eos_token_id for row in r["labelled"])


@pytest.mark.slow
def test_two_process_cli_evaluate_equals_single_process(tmp_path, capsys):
    from optimum_odllm.cli import main

    args = make_cli_task(tmp_path)
    (tmp_path / "cli_args.json").write_text(json.dumps(args))
    launch_two_cpu_processes(tmp_path, "cli")
    launched = json.loads((tmp_path / "cli_launched.json").read_text())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(["evaluate", str(tmp_path / "model"), *args, "--output-json", str(tmp_path / "cli_single.json")])
    finally:
        torch.set_num_threads(threads)
    single = json.loads((tmp_path / "cli_single.json").read_text())
    assert launched["processes"] == 2 and single["processes"] == 1
    assert launched["history_excluded"] and single["history_excluded"]  # no repeats in the table: masked by default
    assert launched["users"] == single["users"] == 30
    launched.pop("processes"), single.pop("processes")
    assert launched == single  # every metric and standard error, exactly
    assert "NDCG@10_se" in single and " ± " in capsys.readouterr().out


if __name__ == "__main__":
    {"eval": worker, "train": train_worker, "cli": cli_worker}[sys.argv[2]](Path(sys.argv[1]))
    if torch.distributed.is_initialized():  # gloo's threads must be joined before exit, or the process may abort
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
