"""SASRec (self-attentive sequential recommendation, Kang & McAuley 2018) on MovieLens-100K, as a classic
baseline under exactly the evaluation protocol of the LLM recommender.

Same data and split as ``examples/ml100k_end_to_end.py`` (``leave_one_out``: last item test, second-last
validation, the rest training), the same targets, the same metrics (HR@1/5/10, NDCG@5/10 over the top-20
list, ``optimum_odllm.recsys.metrics``), reported with the user's seen items excluded (``seen_items``: the
same sets the constrained beam search masks) and unmasked, as mean ± standard error over test users, for
several seeds. The epoch is chosen on the validation users (masked NDCG@10), never on test users.

The model is written here (causal self-attention blocks with pre-norm, learned positions, item embeddings
shared with the output layer). Training uses a full softmax over all items (cross-entropy) instead of the
paper's one-negative binary cross-entropy: with 1,682 items it is cheap, and it is known to make SASRec a
stronger baseline, which is the conservative choice for a comparison the LLM is supposed to win.

    nice -n 5 python benchmarks/sasrec.py                       # 3 seeds, CPU, writes benchmarks/results/sasrec_ml100k.{json,md}
    python benchmarks/sasrec.py --seeds 0 --epochs 20            # quick look
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, write_json  # noqa: E402
from recsys_common import METRICS, load_split  # noqa: E402

from optimum_odllm.recsys.history import seen_items  # noqa: E402
from optimum_odllm.recsys.metrics import STDERR_SUFFIX, per_user_metrics, summarize  # noqa: E402

TOP_K = 20  # the LLM recommender's beam width: lists of 20 items
RESULTS = Path(__file__).resolve().parent / "results"


class Block(nn.Module):
    """Pre-norm causal self-attention + position-wise feed-forward, each with a residual connection."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, h, h, attn_mask=causal, need_weights=False)[0])
        return x + self.drop(self.ffn(self.norm2(x)))


class SASRec(nn.Module):
    """Item ids are shifted by one inside the model: 0 is left padding."""

    def __init__(self, n_items: int, hidden: int = 64, blocks: int = 2, heads: int = 1, max_len: int = 50,
                 dropout: float = 0.2):
        super().__init__()
        self.items = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.positions = nn.Embedding(max_len, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)
        self.max_len = max_len
        # nn.Embedding's N(0, 1) with the sqrt(hidden) input scale and the tied output layer starts at logits of
        # std ~sqrt(hidden) (cross-entropy ~50): training then crawls. Unit-scale inputs and logits instead.
        nn.init.normal_(self.items.weight, std=hidden ** -0.5)
        nn.init.normal_(self.positions.weight, std=0.02)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """``[batch, T]`` padded ids (shifted) -> hidden states ``[batch, T, hidden]``."""
        t = seq.shape[1]
        real = (seq > 0).unsqueeze(-1).float()
        x = self.items(seq) * self.items.embedding_dim ** 0.5 + self.positions(torch.arange(t, device=seq.device))
        x = self.drop(x) * real
        causal = torch.ones(t, t, dtype=torch.bool, device=seq.device).triu(1)  # True = may not attend
        for block in self.blocks:
            x = block(x, causal) * real
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of every real item (padding column dropped): ``[..., n_items]``."""
        return hidden @ self.items.weight[1:].T


def left_pad(seqs: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """Last ``length`` items of each sequence, shifted by one, left-padded with 0."""
    out = torch.zeros(len(seqs), length, dtype=torch.long)
    for r, s in enumerate(seqs):
        s = list(s)[-length:]
        if s:
            out[r, length - len(s):] = torch.tensor(s) + 1
    return out


def training_batches(train: dict[str, list[int]], max_len: int, batch_size: int, rng: random.Random):
    """Next-item pairs over each user's training sequence: inputs ``s[:-1]``, targets ``s[1:]`` (-100 = pad)."""
    users = [u for u, s in train.items() if len(s) >= 2]
    rng.shuffle(users)
    for start in range(0, len(users), batch_size):
        seqs = [train[u][-(max_len + 1):] for u in users[start : start + batch_size]]
        inputs = left_pad([s[:-1] for s in seqs], max_len)
        targets = left_pad([s[1:] for s in seqs], max_len) - 1
        targets[targets < 0] = -100
        yield inputs, targets


def train_epoch(model: SASRec, optimizer: torch.optim.Optimizer, train: dict[str, list[int]], max_len: int,
                batch_size: int, rng: random.Random) -> float:
    """One pass; returns the mean cross-entropy over predicted positions (NaN/Inf raise)."""
    model.train()
    total, count = 0.0, 0
    for inputs, targets in training_batches(train, max_len, batch_size, rng):
        logits = model.logits(model(inputs))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"SASRec training loss is {loss.item()}: lower --lr")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        n = int((targets != -100).sum())
        total, count = total + loss.item() * n, count + n
    return total / count


@torch.no_grad()
def top_items(model: SASRec, inputs: Sequence[Sequence[int]], exclude: Sequence[set[int]] | None,
              k: int = TOP_K, batch_size: int = 256) -> list[list[int]]:
    """Full ranking over all items from the last position; ``exclude`` items get -inf (never recommended)."""
    model.eval()
    out: list[list[int]] = []
    for start in range(0, len(inputs), batch_size):
        seq = left_pad(inputs[start : start + batch_size], model.max_len)
        scores = model.logits(model(seq)[:, -1])
        if exclude is not None:
            for r, items in enumerate(exclude[start : start + batch_size]):
                if items:
                    scores[r, list(items)] = float("-inf")
        out += scores.topk(k, dim=-1).indices.tolist()
    return out


def evaluate(model: SASRec, inputs, targets, exclude) -> dict[str, float]:
    """Means and standard errors over users of the same metrics as the LLM recommender."""
    return summarize(per_user_metrics(top_items(model, inputs, exclude), targets), with_stderr=True)


def protocol(split) -> dict[str, tuple]:
    """Validation and test tasks: model input (full prefix), target, and seen items per user."""
    valid = {ex.user: ex for ex in split.valid}
    test_inputs = []
    for ex in split.test:
        prefix = split.train[ex.user] + [valid[ex.user].target]
        if prefix[-len(ex.history):] != list(ex.history):
            raise RuntimeError(f"user {ex.user}: the test history is not the end of train + validation item")
        test_inputs.append(prefix)
    return {
        "valid": ([split.train[ex.user] for ex in split.valid], [ex.target for ex in split.valid],
                  seen_items(split.train, split.valid)),
        "test": (test_inputs, [ex.target for ex in split.test], seen_items(split.train, split.test)),
    }


def run_seed(seed: int, n_items: int, split, tasks: dict, args) -> dict:
    """Train with early stopping on validation masked NDCG@10; evaluate the best epoch on test users."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = SASRec(n_items, args.hidden, args.blocks, args.heads, args.max_len, args.dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98))
    best, best_state, best_epoch, waited, losses = -1.0, None, 0, 0, []
    t0 = time.time()
    for epoch in range(1, args.epochs + 1):
        losses.append(train_epoch(model, optimizer, split.train, args.max_len, args.batch_size, rng))
        if epoch % args.eval_every:
            continue
        ndcg = evaluate(model, *tasks["valid"])["NDCG@10"]
        print(f"  seed {seed} epoch {epoch}: train loss {losses[-1]:.4f}, valid NDCG@10 (seen excluded) {ndcg:.4f}",
              flush=True)
        if ndcg > best:
            best, best_state, best_epoch, waited = ndcg, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            waited += 1
            if waited >= args.patience:
                break
    train_s = time.time() - t0
    model.load_state_dict(best_state)
    inputs, targets, seen = tasks["test"]
    return {"seed": seed, "best_epoch": best_epoch, "epochs_run": epoch, "valid_NDCG@10": best,
            "train_loss_last": losses[-1], "train_s": round(train_s, 1),
            "masked": evaluate(model, inputs, targets, seen), "unmasked": evaluate(model, inputs, targets, None)}


def across_seeds(runs: list[dict], mode: str) -> dict[str, float]:
    """Mean over seeds, the spread between seeds (sample std), and the mean per-user standard error."""
    out = {}
    for m in METRICS:
        values = [r[mode][m] for r in runs]
        out[m] = statistics.fmean(values)
        out[m + "_seed_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out[m + STDERR_SUFFIX] = statistics.fmean(r[mode][m + STDERR_SUFFIX] for r in runs)
    return out


def table(runs: list[dict], summary: dict) -> str:
    cols = [f"{m}" for m in METRICS]
    lines = ["| run | protocol | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    cell = lambda r, m: f"{r[m]:.4f} ± {r[m + STDERR_SUFFIX]:.4f}"  # noqa: E731
    for mode, label in (("masked", "seen excluded"), ("unmasked", "unmasked")):
        for r in runs:
            lines.append(f"| seed {r['seed']} (epoch {r['best_epoch']}) | {label} | "
                         + " | ".join(cell(r[mode], m) for m in METRICS) + " |")
        s = summary[mode]
        lines.append(f"| mean of {len(runs)} seeds (± mean s.e.; seed std) | {label} | "
                     + " | ".join(f"{s[m]:.4f} ± {s[m + STDERR_SUFFIX]:.4f}; {s[m + '_seed_std']:.4f}" for m in METRICS)
                     + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--patience", type=int, default=6, help="evaluations without validation gain before stopping")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-path", default=None)
    p.add_argument("--output", default=str(RESULTS / "sasrec_ml100k.json"))
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data, split = load_split(args.data_path)
    tasks = protocol(split)
    t0 = time.time()
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(seed, data.n_items, split, tasks, args))
        r = runs[-1]
        print(f"seed {seed}: best epoch {r['best_epoch']} (valid NDCG@10 {r['valid_NDCG@10']:.4f}), "
              f"test NDCG@10 masked {r['masked']['NDCG@10']:.4f}, unmasked {r['unmasked']['NDCG@10']:.4f}", flush=True)
        summary = {mode: across_seeds(runs, mode) for mode in ("masked", "unmasked")}
        payload = {"benchmark": "sasrec", "machine": machine_info(), "dataset": data.name, "test_users": len(split.test),
                   "top_k": TOP_K, "settings": vars(args), "wall_s": round(time.time() - t0, 1), "runs": runs,
                   "summary": summary}
        write_json(args.output, payload)  # after every seed: a run cut short still reports the finished seeds
    md = table(runs, summary)
    Path(args.output).with_suffix(".md").write_text(
        f"SASRec on {data.name}, {len(split.test)} test users, top-{TOP_K} lists; "
        f"{payload['machine']['date']}, {payload['machine']['cpu']}, {args.threads} threads\n\n" + md + "\n")
    print(md)
    print(f"wrote {args.output} in {payload['wall_s']:.0f}s")
    return payload


if __name__ == "__main__":
    main()
