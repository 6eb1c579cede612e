"""LC-Rec item indexing: item text embeddings -> RQ-VAE semantic codes -> unique index tokens.

Each item becomes a short tuple of codes, one per residual-quantization level, rendered as tokens
``<a_12><b_3><c_200>``. Items with similar text share code prefixes, which lets the LM generalise
across items. Codes must be unique so that a generated code names exactly one item: collisions are
resolved by moving colliding items to the nearest free code of the last level (a greedy form of
LC-Rec's uniform semantic mapping) and, if that is impossible, by an extra disambiguation level.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging


logger = logging.get_logger(__name__)

INDEX_FILE = "item_index.json"
LEVEL_NAMES = "abcdefghij"
_TOKEN_RE = re.compile(r"<([a-j])_(\d+)>")


# --------------------------------------------------------------------------------------------------
# Item text embeddings
# --------------------------------------------------------------------------------------------------


def _features(text: str) -> list[str]:
    words = re.findall(r"\w+", text.lower())
    grams = [f"w:{w}" for w in words] + [f"b:{a}_{b}" for a, b in zip(words, words[1:])]
    for w in words:
        padded = f"#{w}#"
        grams += [f"c:{padded[k:k + 3]}" for k in range(len(padded) - 2)]
    return grams


def offline_text_embeddings(texts: Sequence[str], dim: int = 64, buckets: int = 2**14, seed: int = 0) -> torch.Tensor:
    """Download-free embeddings: hashed TF-IDF of words, bigrams and character trigrams, reduced by SVD (LSA).

    Deterministic (md5 hashing, seeded randomized SVD) and good enough to give similar titles similar codes.
    """
    rows, cols, vals = [], [], []
    df = torch.zeros(buckets)
    for r, text in enumerate(texts):
        counts: dict[int, float] = defaultdict(float)
        for g in _features(text):
            counts[int(hashlib.md5(g.encode()).hexdigest()[:8], 16) % buckets] += 1.0
        for c, v in counts.items():
            rows.append(r)
            cols.append(c)
            vals.append(1.0 + math.log(v))
            df[c] += 1
    idf = torch.log((1 + len(texts)) / (1 + df)) + 1
    x = torch.zeros(len(texts), buckets)
    x[torch.tensor(rows), torch.tensor(cols)] = torch.tensor(vals)
    x = x * idf
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    x = x - x.mean(0, keepdim=True)
    u, s = _seeded_svd_lowrank(x, dim, seed)
    return (u * s).contiguous()


def _seeded_svd_lowrank(x: torch.Tensor, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``dim`` left singular vectors and values of ``x`` (dense or sparse), reproducible from ``seed``
    without disturbing the caller's random state."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        u, s, _ = torch.svd_lowrank(x, q=min(dim, min(x.shape) - 1), niter=4)
    finally:
        torch.random.set_rng_state(gen_state)
    return u, s


def cooccurrence_ppmi(sequences: Iterable[Sequence[int]], n_items: int, window: int = 10) -> torch.Tensor:
    """Positive pointwise mutual information of items met within ``window`` steps of each other in one user's
    sequence, as a symmetric sparse ``[n_items, n_items]`` matrix (zero diagonal).

    PPMI(i, j) = max(0, log(n_ij * N / (n_i * n_j))) with n_ij the co-occurrence count, n_i its row sum and N
    the total: popular items are not similar to everything merely by being frequent.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    left, right = [], []
    for seq in sequences:
        seq = torch.as_tensor(list(seq), dtype=torch.long)
        for d in range(1, min(window, len(seq) - 1) + 1):
            left.append(seq[:-d])
            right.append(seq[d:])
    if not left:
        raise ValueError("no two items co-occur in the sequences: collaborative embeddings need interactions")
    a, b = torch.cat(left), torch.cat(right)
    ids = torch.cat([a, b])
    if int(ids.min()) < 0 or int(ids.max()) >= n_items:
        raise ValueError(f"item ids must lie in [0, {n_items}); the sequences hold ids outside it")
    keep = a != b  # an item next to itself says nothing about similarity
    rows, cols = torch.cat([a[keep], b[keep]]), torch.cat([b[keep], a[keep]])
    counts = torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.ones(len(rows), dtype=torch.float64),
                                     (n_items, n_items), check_invariants=True).coalesce()
    (r, c), n = counts.indices(), counts.values()
    item_totals = torch.zeros(n_items, dtype=torch.float64).index_add_(0, r, n)
    pmi = torch.log(n * n.sum() / (item_totals[r] * item_totals[c]))
    positive = pmi > 0
    return torch.sparse_coo_tensor(torch.stack([r[positive], c[positive]]), pmi[positive].float(),
                                   (n_items, n_items), check_invariants=True).coalesce()


def collaborative_item_embeddings(sequences: Iterable[Sequence[int]], n_items: int, dim: int = 64, window: int = 10,
                                  seed: int = 0) -> torch.Tensor:
    """Item embeddings from interactions alone: the truncated SVD of :func:`cooccurrence_ppmi` (rows U·sqrt(S)).

    Items that the same users meet close together get nearby vectors, so the RQ-VAE gives them shared code
    prefixes ("collaborative" semantic IDs) instead of prefixes shared by similar titles. Pass **training**
    sequences only: validation and test targets must not shape the index. Items never seen in them get the
    zero vector (their codes then come from the other half of a ``hybrid`` index, or from collision repair).
    """
    ppmi = cooccurrence_ppmi(sequences, n_items, window)
    u, s = _seeded_svd_lowrank(ppmi, dim, seed)
    return (u * s.sqrt()).contiguous()


def hybrid_item_embeddings(text: torch.Tensor, collaborative: torch.Tensor) -> torch.Tensor:
    """Text and collaborative embeddings side by side, each column standardised so both halves weigh alike."""
    if len(text) != len(collaborative):
        raise ValueError(f"{len(text)} text embeddings but {len(collaborative)} collaborative ones")
    return torch.cat([_standardized(text.float()), _standardized(collaborative.float())], dim=1)


def _standardized(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(0)) / x.std(0).clamp_min(1e-6)


def sentence_transformer_embeddings(texts: Sequence[str], model_name: str, batch_size: int = 64) -> torch.Tensor:
    """Embeddings from a sentence-transformers model (needs the package and the Hub or a local path)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ImportError("pip install sentence-transformers to use the 'sentence-transformers' backend") from e
    model = SentenceTransformer(model_name)
    return torch.as_tensor(model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True))


@torch.no_grad()
def lm_hidden_state_embeddings(model, tokenizer, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled last hidden states of a (fine-tuned) causal LM, as LC-Rec does with LLaMA."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for k in tqdm(range(0, len(texts), batch_size), desc="embedding items", leave=False):
        enc = [tokenizer(t, add_special_tokens=False)["input_ids"] or [pad] for t in texts[k : k + batch_size]]
        width = max(map(len, enc))
        ids = torch.tensor([e + [pad] * (width - len(e)) for e in enc], device=device)
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc], device=device)
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1].float()
        out.append(((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).cpu())
    return torch.cat(out)


def embed_items(texts: Sequence[str], backend: str = "offline", model=None, tokenizer=None, model_name: str | None = None,
                sequences: Iterable[Sequence[int]] | None = None) -> torch.Tensor:
    """Dispatch to an embedding backend: text only (``offline``, the default; ``sentence-transformers``; ``lm``),
    or from interactions: ``collaborative`` (item co-occurrence in ``sequences``, the users' **training** item-id
    sequences) and ``hybrid`` (``offline`` text and ``collaborative`` side by side)."""
    if backend in ("collaborative", "hybrid"):
        if sequences is None:
            raise ValueError(f"the {backend!r} backend needs sequences= (the users' training sequences of item ids)")
        collaborative = collaborative_item_embeddings(sequences, len(texts))
        return collaborative if backend == "collaborative" else hybrid_item_embeddings(offline_text_embeddings(texts), collaborative)
    if backend == "offline":
        return offline_text_embeddings(texts)
    if backend == "sentence-transformers":
        return sentence_transformer_embeddings(texts, model_name or "sentence-transformers/all-MiniLM-L6-v2")
    if backend == "lm":
        if model is None or tokenizer is None:
            raise ValueError("the 'lm' backend needs model= and tokenizer=")
        return lm_hidden_state_embeddings(model, tokenizer, texts)
    raise ValueError(f"unknown embedding backend {backend!r}: use offline, sentence-transformers, lm, collaborative or hybrid")


# --------------------------------------------------------------------------------------------------
# RQ-VAE
# --------------------------------------------------------------------------------------------------


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if k < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _kmeans(x: torch.Tensor, k: int, iters: int = 20) -> torch.Tensor:
    """Plain k-means (k-means++-free: random distinct points) used to initialise codebooks."""
    centers = x[torch.randperm(len(x))[:k]].clone()
    if len(centers) < k:  # fewer points than codes: pad with jittered copies
        extra = centers[torch.randint(len(centers), (k - len(centers),))] + 1e-3 * torch.randn(k - len(centers), x.shape[1])
        centers = torch.cat([centers, extra])
    for _ in range(iters):
        assign = torch.cdist(x, centers).argmin(1)
        for c in range(k):
            members = x[assign == c]
            if len(members):
                centers[c] = members.mean(0)
    return centers


class RQVAE(nn.Module):
    """Residual-quantized autoencoder (LC-Rec/TIGER): ``levels`` codebooks of ``codebook_size`` vectors."""

    def __init__(self, in_dim: int, latent_dim: int = 32, hidden: Sequence[int] = (256, 128), levels: int = 3,
                 codebook_size: int = 256, beta: float = 0.25):
        super().__init__()
        self.encoder = _mlp([in_dim, *hidden, latent_dim])
        self.decoder = _mlp([latent_dim, *reversed(hidden), in_dim])
        self.codebooks = nn.ParameterList([nn.Parameter(torch.randn(codebook_size, latent_dim) * 0.1) for _ in range(levels)])
        self.beta = beta

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor) -> None:
        residual = self.encoder(x)
        for cb in self.codebooks:
            cb.data.copy_(_kmeans(residual, cb.shape[0]))
            residual = residual - cb[torch.cdist(residual, cb).argmin(1)]

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return quantized latent, codes ``[n, levels]`` and the codebook/commitment loss."""
        residual, quantized, codes, loss = z, torch.zeros_like(z), [], z.new_zeros(())
        for cb in self.codebooks:
            idx = torch.cdist(residual, cb).argmin(1)
            e = cb[idx]
            loss = loss + ((residual.detach() - e) ** 2).mean() + self.beta * ((residual - e.detach()) ** 2).mean()
            quantized = quantized + e
            residual = residual - e.detach()
            codes.append(idx)
        return quantized, torch.stack(codes, 1), loss

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        q, codes, q_loss = self.quantize(z)
        x_hat = self.decoder(z + (q - z).detach())  # straight-through estimator
        return x_hat, codes, ((x_hat - x) ** 2).mean() + q_loss

    @torch.no_grad()
    def last_level_distances(self, x: torch.Tensor) -> torch.Tensor:
        """Distance of every item's last-level residual to every last-level code (for collision repair)."""
        residual = self.encoder(x)
        for cb in self.codebooks[:-1]:
            residual = residual - cb[torch.cdist(residual, cb).argmin(1)]
        return torch.cdist(residual, self.codebooks[-1])


def train_rqvae(embeddings: torch.Tensor, levels: int = 3, codebook_size: int = 256, latent_dim: int = 32,
                steps: int = 2000, lr: float = 1e-3, seed: int = 0) -> RQVAE:
    """Full-batch Adam training of an :class:`RQVAE` on standardised item embeddings."""
    torch.manual_seed(seed)
    x = embeddings.float()
    model = RQVAE(x.shape[1], latent_dim, levels=levels, codebook_size=codebook_size)
    model.init_codebooks(x)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in tqdm(range(steps), desc="RQ-VAE", leave=False):
        _, _, loss = model(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == steps - 1:
            logger.info(f"RQ-VAE step {step}: loss {loss.item():.4f}")
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Unique codes and the saved index
# --------------------------------------------------------------------------------------------------


def count_collisions(codes: Sequence[Sequence[int]]) -> int:
    """Number of items whose code is shared with at least one other item."""
    counts: dict[tuple[int, ...], int] = defaultdict(int)
    for c in codes:
        counts[tuple(c)] += 1
    return sum(n for n in counts.values() if n > 1)


def make_unique(codes: Sequence[Sequence[int]], distances: torch.Tensor | None = None,
                strategy: str = "reassign") -> list[tuple[int, ...]]:
    """Make every item's code unique.

    ``reassign``: within a collision group the item closest to its code keeps it; the others move to
    the nearest last-level code whose full tuple is free (needs ``distances`` ``[n_items, codebook]``).
    Whatever still collides, or everything with ``extra_level``, gets an extra level numbering the
    items that share a code (0 for the first), so all codes keep the same length.
    """
    codes = [tuple(int(v) for v in c) for c in codes]
    if strategy not in ("reassign", "extra_level"):
        raise ValueError(f"unknown strategy {strategy!r}")
    if strategy == "reassign" and distances is not None and count_collisions(codes):
        used = set()
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, c in enumerate(codes):
            groups[c].append(i)
        used.update(groups)
        for c, members in groups.items():
            if len(members) < 2:
                continue
            members.sort(key=lambda i: float(distances[i, c[-1]]))
            for i in members[1:]:
                for alt in distances[i].argsort().tolist():
                    candidate = c[:-1] + (alt,)
                    if candidate not in used:
                        codes[i] = candidate
                        used.add(candidate)
                        break
    if count_collisions(codes) or strategy == "extra_level":
        seen: dict[tuple[int, ...], int] = defaultdict(int)
        out = []
        for c in codes:
            out.append(c + (seen[c],))
            seen[c] += 1
        codes = out
    return codes


@dataclass
class ItemIndex:
    """Unique semantic codes of all items and their token strings; saved as JSON next to the model."""

    codes: list[tuple[int, ...]]
    item_ids: list[str] = field(default_factory=list)
    collisions_before: int = 0

    def __post_init__(self):
        self.codes = [tuple(int(v) for v in c) for c in self.codes]
        if len({len(c) for c in self.codes}) > 1:
            raise ValueError("all item codes must have the same number of levels")
        if count_collisions(self.codes):
            raise ValueError(f"{count_collisions(self.codes)} items share codes; use make_unique first")
        if not self.item_ids:
            self.item_ids = [str(i) for i in range(len(self.codes))]
        self._by_code = {c: i for i, c in enumerate(self.codes)}

    @property
    def levels(self) -> int:
        return len(self.codes[0]) if self.codes else 0

    def item_tokens(self, item: int) -> list[str]:
        """Token strings of one item, e.g. ``['<a_12>', '<b_3>', '<c_200>']``."""
        return [f"<{LEVEL_NAMES[level]}_{v}>" for level, v in enumerate(self.codes[item])]

    def item_string(self, item: int) -> str:
        return "".join(self.item_tokens(item))

    def all_tokens(self) -> list[str]:
        """Every index token used by some item, level by level (to add to a tokenizer)."""
        tokens = []
        for level in range(self.levels):
            tokens += [f"<{LEVEL_NAMES[level]}_{v}>" for v in sorted({c[level] for c in self.codes})]
        return tokens

    def item_of_code(self, code: Sequence[int]) -> int | None:
        return self._by_code.get(tuple(code))

    def item_of_string(self, text: str) -> int | None:
        """Parse ``<a_1><b_2>...`` back to the item (``None`` if it is not a valid item)."""
        code = tuple(int(v) for _, v in _TOKEN_RE.findall(text))
        return self.item_of_code(code)

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / INDEX_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"levels": self.levels, "item_ids": self.item_ids,
                                    "codes": [list(c) for c in self.codes],
                                    "collisions_before": self.collisions_before}))
        return path

    @classmethod
    def load(cls, directory_or_file: str | os.PathLike) -> "ItemIndex":
        path = Path(directory_or_file)
        if path.is_dir():
            path = path / INDEX_FILE
        data = json.loads(path.read_text())
        return cls(codes=[tuple(c) for c in data["codes"]], item_ids=data["item_ids"],
                   collisions_before=data.get("collisions_before", 0))


def build_item_index(texts: Sequence[str], item_ids: Sequence[str] | None = None, levels: int = 3,
                     codebook_size: int = 256, embeddings: torch.Tensor | None = None, backend: str = "offline",
                     steps: int = 2000, strategy: str = "reassign", seed: int = 0, **embed_kwargs) -> ItemIndex:
    """Embed item texts, train the RQ-VAE, make codes unique and report collisions."""
    if embeddings is None:
        embeddings = embed_items(texts, backend=backend, **embed_kwargs)
    x = _standardized(embeddings.float())
    if not torch.isfinite(x).all():
        raise ValueError("item embeddings hold NaN or Inf")
    rqvae = train_rqvae(x, levels=levels, codebook_size=codebook_size, steps=steps, seed=seed)
    with torch.no_grad():
        _, codes, _ = rqvae(x)
    raw = [tuple(c) for c in codes.tolist()]
    before = count_collisions(raw)
    unique = make_unique(raw, rqvae.last_level_distances(x), strategy=strategy)
    logger.warning(
        f"RQ-VAE indexing: {before} of {len(raw)} items collided ({len(set(raw))} distinct codes); "
        f"after '{strategy}' all {len(unique)} codes are unique with {len(unique[0])} levels."
    )
    return ItemIndex(codes=unique, item_ids=list(item_ids) if item_ids is not None else [], collisions_before=before)
