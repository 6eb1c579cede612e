"""Recommender side: split, loaders, unique codes, trie-constrained beam search, metrics (fast, offline)."""

from __future__ import annotations

import math
import zipfile

import pytest
import torch
from torch import nn

from optimum_odllm.recsys.data import (
    Example,
    MalformedDataError,
    build_dataset,
    leave_one_out,
    load_interactions_table,
    load_movielens_100k,
    read_atomic_file,
    training_examples,
)
from optimum_odllm.recsys.evaluation import popularity_rankings
from optimum_odllm.recsys.indexing import (
    ItemIndex,
    build_item_index,
    collaborative_item_embeddings,
    cooccurrence_ppmi,
    count_collisions,
    embed_items,
    make_unique,
)
from optimum_odllm.recsys.instructions import (
    IGNORE_INDEX,
    PACKED_SEQREC_TEMPLATE,
    InstructionEncoder,
    packed_sequences,
)
from optimum_odllm.recsys.metrics import ranking_metrics
from optimum_odllm.recsys.training import build_offline_model, build_offline_tokenizer
from optimum_odllm.recsys.trie import PrefixTrie, constrained_beam_search


def _left_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded to the longest row, and their attention mask."""
    width = max(map(len, rows))
    prompts = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return prompts, mask


# ---------------------------------------------------------------------------------------------- data


def test_build_dataset_sorts_chronologically_with_stable_ties():
    rows = [("u1", "b", 20), ("u1", "a", 10), ("u2", "c", 5), ("u1", "c", 20), ("u2", "a", 7)]
    ds = build_dataset("toy", rows, {"a": "alpha", "b": "beta"})
    # item ids follow first appearance in time: c(5), a(7), b(20)
    assert ds.item_ids == ["c", "a", "b"]
    assert ds.item_text == ["item c", "alpha", "beta"]
    names = {u: [ds.item_ids[i] for i in seq] for u, seq in ds.sequences.items()}
    assert names == {"u1": ["a", "b", "c"], "u2": ["c", "a"]}  # b before c: same time, file order


def test_k_core_filter_iterates():
    rows = [("u1", "a", 1), ("u1", "b", 2), ("u2", "a", 3), ("u2", "b", 4), ("u3", "a", 5)]
    ds = build_dataset("toy", rows, min_user_interactions=2, min_item_interactions=2)
    assert set(ds.sequences) == {"u1", "u2"} and ds.n_interactions == 4


def test_leave_one_out_never_leaks_targets_into_training():
    seqs = {"u": [5, 3, 8, 1, 9, 2], "short": [4, 7]}
    split = leave_one_out(seqs, history=3)
    assert split.train == {"u": [5, 3, 8, 1], "short": [4, 7]}
    assert split.valid == [Example("u", (3, 8, 1), 9)]
    assert split.test == [Example("u", (8, 1, 9), 2)]
    for ex in training_examples(split.train, history=3):
        assert ex.target not in (9, 2)
    windows = [(ex.history, ex.target) for ex in training_examples({"u": split.train["u"]}, history=2)]
    assert windows == [((5,), 3), ((5, 3), 8), ((3, 8), 1)]


def test_leave_one_out_on_movielens_positions():
    ds = load_movielens_100k()
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (943, 1682, 100000)
    split = leave_one_out(ds.sequences)
    assert len(split.test) == len(split.valid) == 943
    for ex in split.test:
        full = ds.sequences[ex.user]
        assert split.train[ex.user] == full[:-2]  # last two positions held out
        assert ex.target == full[-1] and ex.history[-1] == full[-2] and len(ex.history) == min(20, len(full) - 1)


def test_atomic_file_error_names_file_and_line():
    lines = ["user_id:token\titem_id:token\ttimestamp:float", "1\t2\t3", "1\t2"]
    with pytest.raises(MalformedDataError, match=r"ml\.inter, line 3: expected 3"):
        read_atomic_file(lines, "ml.inter")


def test_movielens_from_wheel_and_bad_timestamp(tmp_path):
    inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t5\t100\n1\t11\t4\t200\n"
    item = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n10\tHeat\t1995\tAction\n"
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("recbole/dataset_example/ml-100k/ml-100k.inter", inter)
        zf.writestr("recbole/dataset_example/ml-100k/ml-100k.item", item)
    ds = load_movielens_100k(wheel)
    assert ds.item_text[:1] == ["Heat (1995) Action"] and ds.sequences == {"1": [0, 1]}
    d = tmp_path / "ml"
    d.mkdir()
    (d / "ml-100k.inter").write_text(inter + "2\t10\t3\tyesterday\n")
    (d / "ml-100k.item").write_text(item)
    with pytest.raises(MalformedDataError, match=r"ml-100k\.inter, line 4: timestamp 'yesterday'"):
        load_movielens_100k(d)


def test_csv_loader_and_error_line(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("user_id,item_id,timestamp\nu,a,2\nu,b,1\n")
    meta = tmp_path / "items.csv"
    meta.write_text("item_id,title\na,Alpha\nb,Beta\n")
    ds = load_interactions_table(str(good), str(meta))
    assert [ds.item_text[i] for i in ds.sequences["u"]] == ["Beta", "Alpha"]
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id,timestamp\nu,a,2\nu,,1\n")
    with pytest.raises(MalformedDataError, match=r"bad\.csv, line 3"):
        load_interactions_table(str(bad))


# ------------------------------------------------------------------------------------------ indexing


def test_make_unique_reassigns_to_nearest_free_code():
    codes = [(0, 1), (0, 1), (0, 1), (2, 0)]
    # item 1 is closest to code 1 -> keeps it; item 0 -> next nearest free (0, 3); item 2 -> (0, 2)
    distances = torch.tensor([[9.0, 1.0, 5.0, 2.0], [9.0, 0.5, 5.0, 6.0], [9.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    assert make_unique(codes, distances) == [(0, 3), (0, 1), (0, 2), (2, 0)]


def test_make_unique_extra_level_numbers_duplicates():
    out = make_unique([(1, 2), (1, 2), (3, 4)], strategy="extra_level")
    assert out == [(1, 2, 0), (1, 2, 1), (3, 4, 0)]
    assert count_collisions([(1, 2), (1, 2), (3, 4)]) == 2 and count_collisions(out) == 0


def test_rqvae_index_is_unique_and_round_trips(tmp_path):
    texts = [f"movie {k % 7} about topic {k % 3}" for k in range(60)]  # many identical texts -> collisions
    index = build_item_index(texts, levels=2, codebook_size=4, steps=50)
    assert index.collisions_before > 0
    assert len(set(index.codes)) == 60 and count_collisions(index.codes) == 0
    assert index.levels in (2, 3)  # 4x4 = 16 codes < 60 items: an extra level is needed
    loaded = ItemIndex.load(index.save(tmp_path))
    assert loaded.codes == index.codes
    assert loaded.item_of_string(index.item_string(17)) == 17
    assert loaded.item_of_string("<a_99><b_99>") is None



def _dense_ppmi_by_hand(sequences, n_items, window):
    """Reference: count every ordered pair within the window by loops, symmetrise, PPMI from the definition."""
    counts = [[0.0] * n_items for _ in range(n_items)]
    for seq in sequences:
        for i in range(len(seq)):
            for j in range(i + 1, min(len(seq), i + window + 1)):
                if seq[i] != seq[j]:
                    counts[seq[i]][seq[j]] += 1
                    counts[seq[j]][seq[i]] += 1
    total = sum(map(sum, counts))
    rows = [sum(r) for r in counts]
    return [[max(0.0, math.log(counts[i][j] * total / (rows[i] * rows[j]))) if counts[i][j] else 0.0
             for j in range(n_items)] for i in range(n_items)]


def test_cooccurrence_ppmi_matches_the_definition():
    sequences = [[0, 1, 2, 3], [1, 2, 1, 4], [0, 3, 3, 2], [4, 0]]  # a repeat (3, 3) and an item next to itself
    for window in (1, 2, 5):
        got = cooccurrence_ppmi(sequences, n_items=6, window=window).to_dense()
        assert torch.allclose(got, torch.tensor(_dense_ppmi_by_hand(sequences, 6, window)), atol=1e-6)
        assert torch.equal(got, got.T) and got.diagonal().abs().sum() == 0 and got[5].abs().sum() == 0


def test_cooccurrence_ppmi_refuses_bad_input():
    with pytest.raises(ValueError, match="window"):
        cooccurrence_ppmi([[0, 1]], 2, window=0)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        cooccurrence_ppmi([[0, 2]], 2)
    with pytest.raises(ValueError, match="co-occur"):
        cooccurrence_ppmi([[0], []], 2)
    with pytest.raises(ValueError, match="sequences="):
        embed_items(["a", "b"], backend="collaborative")


def _two_communities(n_per_group: int = 12, users: int = 80, seed: int = 0) -> list[list[int]]:
    """Each user watches items of one group only: items 0..n-1 or n..2n-1; item 2n is never watched."""
    rng = torch.Generator().manual_seed(seed)
    return [(torch.randperm(n_per_group, generator=rng)[:8] + (u % 2) * n_per_group).tolist() for u in range(users)]


def test_collaborative_embeddings_put_co_watched_items_together():
    sequences, n = _two_communities(users=400), 12
    state = torch.random.get_rng_state()
    emb = collaborative_item_embeddings(sequences, 2 * n + 1, dim=8, window=8, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    assert torch.equal(emb, collaborative_item_embeddings(sequences, 2 * n + 1, dim=8, window=8, seed=0))
    assert emb.shape == (2 * n + 1, 8) and torch.isfinite(emb).all() and emb[2 * n].abs().max() == 0
    unit = torch.nn.functional.normalize(emb[: 2 * n], dim=1)
    cos = unit @ unit.T
    same = torch.block_diag(torch.ones(n, n), torch.ones(n, n)).bool()
    assert cos[same].min() > cos[~same].max() + 0.2  # every within-group pair closer than every cross-group pair


def test_embed_items_interaction_backends():
    sequences, n = _two_communities(), 12
    texts = [f"title {k}" for k in range(2 * n + 1)]
    collaborative = embed_items(texts, backend="collaborative", sequences=sequences)
    assert torch.equal(collaborative, collaborative_item_embeddings(sequences, len(texts)))
    hybrid = embed_items(texts, backend="hybrid", sequences=sequences)
    text = embed_items(texts)
    assert hybrid.shape == (len(texts), text.shape[1] + collaborative.shape[1])
    standardized = (text - text.mean(0)) / text.std(0)
    assert torch.allclose(hybrid[:, : text.shape[1]], standardized, atol=1e-5)  # each half weighs alike
    index = build_item_index(texts, levels=2, codebook_size=4, steps=20, backend="hybrid", sequences=sequences)
    assert len(set(index.codes)) == len(texts)

# -------------------------------------------------------------------------------------- instructions


def _toy_index() -> ItemIndex:
    return ItemIndex(codes=[(0, 0), (0, 1), (1, 0), (2, 3)])


def test_instruction_sample_masks_prompt_and_maps_items():
    index = _toy_index()
    texts = ["red apple", "green pear", "blue plum", "black fig"]
    tok = build_offline_tokenizer(texts, index)
    enc = InstructionEncoder(tok, index, texts)
    a = tok.convert_tokens_to_ids(["<a_0>", "<b_1>", "<a_2>", "<b_3>"])
    sample = enc.sample(PACKED_SEQREC_TEMPLATE, history=[1, 3])
    prompt = [tok.bos_token_id] + tok("history :", add_special_tokens=False)["input_ids"]
    assert sample["input_ids"] == prompt + a + [tok.eos_token_id]
    assert sample["labels"] == [IGNORE_INDEX] * len(prompt) + a + [tok.eos_token_id]
    assert enc.prompt_ids(PACKED_SEQREC_TEMPLATE, [1, 3]) == prompt + a


def test_packed_sequences_cover_every_training_position():
    train = {"u": list(range(50)), "v": [1, 2]}
    chunks = packed_sequences(train, history=20)
    assert all(len(c) <= 21 for c in chunks)
    covered = {(c[k - 1], c[k]) for c in chunks for k in range(1, len(c))}
    assert covered == {(k - 1, k) for k in range(1, 50)} | {(1, 2)}


# ---------------------------------------------------------------------------------- trie/beam search


def test_trie_allowed_tokens():
    trie = PrefixTrie([(5, 7, 9), (5, 8, 9), (6, 7, 1)])
    assert trie.allowed(()).tolist() == [5, 6]
    assert trie.allowed((5,)).tolist() == [7, 8]
    assert trie.allowed((6, 7)).tolist() == [1]
    assert trie.allowed((7,)).numel() == 0
    assert trie.item((5, 8, 9)) == 1 and trie.item((5, 7, 1)) is None
    assert trie.allowed((5,), {(5,): frozenset({7})}).tolist() == [8]  # blocked children removed


def test_recommend_builds_the_item_trie_once_per_encoder(monkeypatch):
    from optimum_odllm.recsys import PACKED_SEQREC_TEMPLATE, recommend
    from optimum_odllm.recsys import trie as trie_module
    from optimum_odllm.recsys.data import Example

    index = ItemIndex(codes=[(a, b, c) for a in range(3) for b in range(2) for c in range(2)][:10])
    texts = [f"item number {k}" for k in range(10)]
    tok = build_offline_tokenizer(texts, index)
    model = build_offline_model(tok, hidden_size=32, num_layers=1, num_heads=2).eval()
    enc = InstructionEncoder(tok, index, texts)
    builds = []
    original = trie_module.PrefixTrie.__init__

    def counting_init(self, sequences):
        builds.append(len(sequences))
        original(self, sequences)

    monkeypatch.setattr(trie_module.PrefixTrie, "__init__", counting_init)
    users = [Example("u1", (1, 2), 3), Example("u2", (4,), 5)]
    first = recommend(model, enc, users, PACKED_SEQREC_TEMPLATE, num_beams=4, progress=False)
    second = [recommend(model, enc, [u], PACKED_SEQREC_TEMPLATE, num_beams=4, progress=False)[0] for u in users]
    assert builds == [10] and second == first  # one build serves every later request, same rankings
    enc.item_ids = enc.item_ids[:6]  # a changed catalogue is noticed
    assert enc.trie.sequences == [tuple(ids) for ids in enc.item_ids] and builds == [10, 6]
    enc.item_ids[0] = enc.item_ids[0][::-1]  # and so is an item's code edited in place
    assert enc.trie.sequences[0] == tuple(enc.item_ids[0]) and builds == [10, 6, 6]


class _TableLM(nn.Module):
    """Next-token log-probs depend only on the last token: a hand-computable scorer with a real KV cache path."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)
        self.dummy = nn.Linear(1, 1)

    def forward(self, input_ids, past_key_values=None, use_cache=True, **_):
        from types import SimpleNamespace

        if past_key_values is not None:
            # store one scalar per position so cache reordering is exercised
            past_key_values.update(input_ids[:, None, :, None].float(), input_ids[:, None, :, None].float(), 0)
        return SimpleNamespace(logits=self.table[input_ids], past_key_values=past_key_values)


def test_constrained_beam_search_matches_brute_force():
    torch.manual_seed(0)
    vocab = 12
    table = torch.randn(vocab, vocab) * 3
    items = [(1, 4, 7), (1, 4, 8), (1, 5, 7), (2, 4, 9), (3, 6, 6), (3, 6, 10), (2, 5, 11)]
    trie = PrefixTrie(items)
    model = _TableLM(table)
    prompts = torch.tensor([[0, 11], [2, 3], [10, 9]])
    ranked, scores = constrained_beam_search(model, prompts, trie, num_beams=5)
    logp = torch.log_softmax(table, -1)
    for row, prompt in enumerate(prompts.tolist()):
        def score(code, last=prompt[-1]):
            total, prev = 0.0, last
            for t in code:
                total, prev = total + float(logp[prev, t]), t
            return total
        # reference: the same beam search written as plain Python over the hand-made log-prob table
        beams = [((), 0.0)]
        for depth in range(3):
            cands = [(p + (t,), s + float(logp[p[-1] if p else prompt[-1], t]))
                     for p, s in beams for t in trie.allowed(p).tolist()]
            beams = sorted(cands, key=lambda x: -x[1])[:5]
        expected = [trie.item(p) for p, _ in beams]
        assert ranked[row] == expected
        assert all(i in range(len(items)) for i in ranked[row])  # every output is a real item
        assert torch.allclose(scores[row], torch.tensor([score(items[i]) for i in expected]), atol=1e-5)


def test_beam_search_on_random_llama_always_returns_valid_items():
    index = ItemIndex(codes=[(a, b, c) for a in range(3) for b in range(2) for c in range(2)][:10])
    texts = [f"item number {k}" for k in range(10)]
    tok = build_offline_tokenizer(texts, index)
    model = build_offline_model(tok, hidden_size=32, num_layers=1, num_heads=2).eval()
    enc = InstructionEncoder(tok, index, texts)
    trie = PrefixTrie(enc.item_ids)
    prompts = torch.tensor([enc.prompt_ids(PACKED_SEQREC_TEMPLATE, [k, (k + 3) % 10]) for k in range(4)])
    ranked, scores = constrained_beam_search(model, prompts, trie, num_beams=20)
    for row in ranked:
        valid = [i for i in row if i >= 0]
        assert sorted(valid) == list(range(10))  # only 10 items exist: all of them, each once
        assert row[10:] == [-1] * 10
    assert torch.isinf(scores[:, 10:]).all() and torch.isfinite(scores[:, :10]).all()
    assert (scores[:, :9] >= scores[:, 1:10]).all()  # best first
    # the top beam equals greedy-by-exhaustive scoring of all 10 items with full forward passes
    with torch.no_grad():
        full = []
        for i in range(10):
            ids = torch.cat([prompts, torch.tensor(enc.item_ids[i]).expand(4, -1)], 1)
            logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
            n = prompts.shape[1]
            full.append(sum(logp[:, n - 1 + t, enc.item_ids[i][t]] for t in range(3)))
        full = torch.stack(full, 1)
    assert torch.allclose(scores[:, :10], full.sort(1, descending=True).values, atol=1e-4)


def test_beam_search_builds_no_autograd_graph_even_with_gradients_enabled():
    index = ItemIndex(codes=[(a, b, c) for a in range(3) for b in range(2) for c in range(2)])
    texts = [f"item number {k}" for k in range(len(index.codes))]
    tok = build_offline_tokenizer(texts, index)
    model = build_offline_model(tok, hidden_size=32, num_layers=1, num_heads=2).eval()
    enc = InstructionEncoder(tok, index, texts)
    prompts = torch.tensor([enc.prompt_ids(PACKED_SEQREC_TEMPLATE, [1, 2])])
    assert torch.is_grad_enabled()
    _, scores = constrained_beam_search(model, prompts, PrefixTrie(enc.item_ids), num_beams=4)
    assert not scores.requires_grad and scores.grad_fn is None


def test_reorder_beams_copies_only_generated_positions_and_equals_reorder_cache():
    from transformers.cache_utils import DynamicCache

    from optimum_odllm.recsys.trie import reorder_beams

    torch.manual_seed(0)
    prompts, beams, prompt_len = 3, 4, 5
    layers = []
    for _ in range(2):  # per layer: one prompt row repeated over its beams, then 2 generated positions per beam
        shared = torch.randn(prompts, 2, prompt_len, 8).repeat_interleave(beams, 0)
        layers.append([torch.cat([shared, torch.randn(prompts * beams, 2, 2, 8)], -2) for _ in range(2)])
    rows = torch.tensor([1, 1, 0, 3, 6, 4, 4, 5, 11, 8, 8, 10])  # a permutation within each prompt's beams

    def cache_of():
        cache = DynamicCache()
        for i, (k, v) in enumerate(layers):
            cache.update(k.clone(), v.clone(), i)
        return cache

    fast, plain = cache_of(), cache_of()
    before = [layer.keys.data_ptr() for layer in fast.layers]
    reorder_beams(fast, rows, prompt_len)
    plain.reorder_cache(rows)
    for a, b in zip(fast.layers, plain.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert [layer.keys.data_ptr() for layer in fast.layers] == before  # reordered in place, no new full copy


def test_beam_search_with_the_prefix_preserving_reorder_equals_the_plain_reorder(monkeypatch):
    """Left padding, exclusions and more items than beams: same items and bit-identical scores either way."""
    import optimum_odllm.recsys.trie as trie_module

    index = ItemIndex(codes=[(a, b, c) for a in range(4) for b in range(4) for c in range(3)])
    texts = [f"item number {k}" for k in range(len(index.codes))]
    tok = build_offline_tokenizer(texts, index)
    model = build_offline_model(tok, hidden_size=32, num_layers=2, num_heads=2, seed=1).eval()
    enc = InstructionEncoder(tok, index, texts)
    trie = PrefixTrie(enc.item_ids)
    rows = [enc.prompt_ids(PACKED_SEQREC_TEMPLATE, h) for h in ([3, 7, 11], [5], [20, 1, 2, 40])]
    prompts, mask = _left_padded(rows, tok.pad_token_id)
    exclude = [{0, 1, 2}, {5}, set()]
    from transformers.cache_utils import DynamicCache

    def whole_cache_copy(self, beam_idx):
        raise AssertionError("the search copied the whole cache")

    with torch.no_grad():
        with monkeypatch.context() as patch:  # the first search must never take the plain path
            patch.setattr(DynamicCache, "reorder_cache", whole_cache_copy)
            fast = constrained_beam_search(model, prompts, trie, num_beams=6, attention_mask=mask, exclude=exclude,
                                           shared_prompt=False)

        class NotADynamicLayer:  # every cache layer now fails the type check: the plain reorder_cache path
            pass

        monkeypatch.setattr(trie_module, "DynamicLayer", NotADynamicLayer)
        plain = constrained_beam_search(model, prompts, trie, num_beams=6, attention_mask=mask, exclude=exclude)
    assert fast[0] == plain[0] and torch.equal(fast[1], plain[1])
    assert all(not set(r) & e for r, e in zip(fast[0], exclude)) and len(index.codes) > 6


def test_tree_attention_mask_by_hand():
    from optimum_odllm.recsys.trie import tree_attention_mask

    prompt_mask = torch.tensor([[False, True, True]])  # one left-padded prompt of 2 tokens
    ancestors = torch.tensor([[[1, 0], [1, 1], [0, 2]]])  # 3 beams, 2 generated blocks: beam j's path per block
    mask = tree_attention_mask(prompt_mask, ancestors, torch.float32)
    visible = (mask == 0).int()[0, 0]
    assert mask.shape == (1, 1, 3, 3 + 2 * 3) and set(mask.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
    assert visible.tolist() == [[0, 1, 1, 0, 1, 0, 1, 0, 0],   # beam 0: block 1 token 1, block 2 token 0
                                [0, 1, 1, 0, 1, 0, 0, 1, 0],   # beam 1: token 1, token 1
                                [0, 1, 1, 1, 0, 0, 0, 0, 1]]   # beam 2: token 0, token 2


def _tiny_causal_lm(kind: str, vocab: int):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    torch.manual_seed(3)
    config = {
        "llama": LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2),
        "qwen2": Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2),
        "gpt2": GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4),
    }[kind]
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_search_equals_the_repeated_prompt_search(kind, attn, monkeypatch):
    """Tree attention over one copy of each prompt's cache gives the same items and scores as repeating the
    prompt per beam (left padding, exclusions, more items than beams), and never repeats the cache."""
    from transformers.cache_utils import DynamicCache

    codes = [(a, b, c) for a in range(4) for b in range(4) for c in range(3)]
    items = [tuple(20 + 10 * level + v for level, v in enumerate(code)) for code in codes]  # token ids 20..52
    trie = PrefixTrie(items)
    model = _tiny_causal_lm(kind, vocab=60)
    model.config._attn_implementation = attn
    rows = [[3, 7, 11, 5, 9], [5, 2], [14, 1, 2, 13]]
    prompts, mask = _left_padded(rows)
    exclude = [{0, 1, 2}, {5}, set()]
    plain = constrained_beam_search(model, prompts, trie, num_beams=6, attention_mask=mask, exclude=exclude,
                                    shared_prompt=False)

    def repeated(self, repeats):
        raise AssertionError("the shared-prompt search repeated the prompt's cache")

    monkeypatch.setattr(DynamicCache, "batch_repeat_interleave", repeated)
    shared = constrained_beam_search(model, prompts, trie, num_beams=6, attention_mask=mask, exclude=exclude)
    assert shared[0] == plain[0]
    assert torch.allclose(shared[1], plain[1], atol=1e-5)
    assert all(not set(r) & e for r, e in zip(shared[0], exclude))
    unpadded = constrained_beam_search(model, prompts[:1], trie, num_beams=6)  # no attention mask at all
    assert unpadded[0][0] == constrained_beam_search(model, prompts[:1], trie, num_beams=6, attention_mask=mask[:1])[0][0]


def test_prefill_computes_only_the_last_positions_logits():
    """The search reads one logit row per prompt after the prefill: the head runs on that row only."""
    items = [tuple(20 + 10 * level + v for level, v in enumerate(code)) for code in [(0, 1, 2), (1, 0, 2), (1, 1, 0)]]
    model = _tiny_causal_lm("llama", vocab=60)
    head_rows = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: head_rows.append(inputs[0].shape[:2]))
    prompts = torch.tensor([[3, 7, 11, 5, 9], [5, 2, 8, 8, 1]])
    constrained_beam_search(model, prompts, PrefixTrie(items), num_beams=2)
    assert head_rows[0] == (2, 1) and all(rows == (2, 2) for rows in head_rows[1:])  # then 2 beams per prompt


def test_shared_prompt_is_the_default_on_cpus_only():
    from transformers.cache_utils import DynamicCache

    from optimum_odllm.recsys.trie import prefers_shared_prompt

    model = _tiny_causal_lm("llama", vocab=60)
    cache = model(input_ids=torch.tensor([[3, 4, 5]]), past_key_values=DynamicCache(), use_cache=True).past_key_values
    assert prefers_shared_prompt(model, cache, torch.device("cpu"))
    assert not prefers_shared_prompt(model, cache, torch.device("cuda"))  # measured no faster there (device only)
    assert not prefers_shared_prompt(_TableLM(torch.randn(4, 4)), cache, torch.device("cpu"))


def test_shared_prompt_search_is_refused_where_it_cannot_run():
    trie = PrefixTrie([(1, 4, 7), (1, 4, 8), (2, 5, 7)])
    model = _TableLM(torch.randn(12, 12))  # not a transformers model: no custom 4-D masks
    with pytest.raises(ValueError, match="shared_prompt=None"):
        constrained_beam_search(model, torch.tensor([[0, 3]]), trie, num_beams=2, shared_prompt=True)
    ranked, _ = constrained_beam_search(model, torch.tensor([[0, 3]]), trie, num_beams=2)  # auto: the repeated path
    assert len(ranked[0]) == 2


# ------------------------------------------------------------------------------------------- metrics


def test_ranking_metrics_against_hand_computation():
    rankings = [["a", "b", "c"], ["x", "y", "z", "t", "u", "v"], ["p"], list("abcdefghijk")]
    targets = ["a", "u", "q", "k"]  # ranks 0, 4, absent, 10 (outside top-10)
    m = ranking_metrics(rankings, targets)
    assert m["HR@1"] == pytest.approx(1 / 4)
    assert m["HR@5"] == pytest.approx(2 / 4)
    assert m["HR@10"] == pytest.approx(2 / 4)
    assert m["NDCG@5"] == pytest.approx((1.0 + 1 / math.log2(6)) / 4)
    assert m["NDCG@10"] == pytest.approx((1.0 + 1 / math.log2(6)) / 4)
    m = ranking_metrics([list("abcdefghij")], ["g"])  # rank 6: in top-10, not top-5
    assert (m["HR@5"], m["HR@10"], m["NDCG@5"]) == (0.0, 1.0, 0.0)
    assert m["NDCG@10"] == pytest.approx(1 / 3)  # 1/log2(8)


def test_evaluate_module_matches():
    evaluate = pytest.importorskip("evaluate")
    from optimum_odllm.metrics import RANKING_METRIC_PATH

    metric = evaluate.load(RANKING_METRIC_PATH)
    got = metric.compute(predictions=[["3", "7", "1"], ["1", "2"]], references=["7", "9"])
    assert got["HR@5"] == 0.5 and got["NDCG@10"] == pytest.approx(0.5 / math.log2(3))


def test_popularity_counts_training_only_and_skips_seen():
    train = {"u": [1, 2, 2], "v": [2, 3], "w": [3, 4]}
    examples = [Example("u", (1, 2), 9), Example("x", (), 1)]
    ranked = popularity_rankings(train, examples, k=3)
    assert ranked[0] == [3, 4]  # 2 and 1 were seen by u; ties broken by smaller id
    assert ranked[1] == [2, 3, 1]
    assert popularity_rankings(train, examples[:1], k=2, exclude_history=False) == [[2, 3]]


def test_compile_for_search_gives_the_eager_rankings_and_keeps_the_shared_prompt(monkeypatch):
    """Compiled forward (AOTAutograd, as Inductor sees it, without the C++ build that takes minutes here; the
    benchmark runs Inductor on the real recommender): same items and scores as eager (left padding, exclusions,
    two prompt lengths), still the tree-attention search (the model stays a PreTrainedModel), really compiled,
    compiled once, weights unchanged."""
    from torch._dynamo.utils import counters
    from transformers.cache_utils import DynamicCache

    from optimum_odllm.recsys import compile_for_search
    from optimum_odllm.recsys.trie import _takes_logits_to_keep

    items = [tuple(20 + 10 * level + v for level, v in enumerate(code))
             for code in [(a, b, c) for a in range(3) for b in range(3) for c in range(3)]]
    trie = PrefixTrie(items)
    model = _tiny_causal_lm("llama", vocab=60)
    rows = [[3, 7, 11, 5, 9], [5, 2], [14, 1, 2, 13]]
    prompts, mask = _left_padded(rows)
    exclude = [{0, 1}, set(), {4}]
    eager = constrained_beam_search(model, prompts, trie, num_beams=5, attention_mask=mask, exclude=exclude)
    eager_short = constrained_beam_search(model, prompts[:2, 2:], trie, num_beams=5, attention_mask=mask[:2, 2:])
    state = {k: v.clone() for k, v in model.state_dict().items()}

    torch._dynamo.reset()
    counters.clear()
    assert compile_for_search(model, backend="aot_eager") is model
    compiled_forward = model.forward
    assert compile_for_search(model, backend="aot_eager") is model and model.forward == compiled_forward  # no re-wrap
    assert _takes_logits_to_keep(model)  # the search still cuts the prompt's logits to the last row
    monkeypatch.setattr(DynamicCache, "batch_repeat_interleave",
                        lambda self, repeats: pytest.fail("the compiled model fell back to the repeated-prompt search"))
    compiled = constrained_beam_search(model, prompts, trie, num_beams=5, attention_mask=mask, exclude=exclude)
    compiled_short = constrained_beam_search(model, prompts[:2, 2:], trie, num_beams=5, attention_mask=mask[:2, 2:])
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo traced the forward: it really is compiled
    assert compiled[0] == eager[0] and compiled_short[0] == eager_short[0]
    assert torch.allclose(compiled[1], eager[1], atol=1e-5) and torch.allclose(compiled_short[1], eager_short[1], atol=1e-5)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    del model.forward  # undone: the class's forward again
    assert model.forward.__func__ is type(model).forward
    torch._dynamo.reset()


def test_compile_for_search_refuses_what_it_cannot_compile_safely():
    from optimum_odllm.recsys import compile_for_search

    with pytest.raises(TypeError, match="PreTrainedModel"):
        compile_for_search(nn.Linear(2, 2))
    model = _tiny_causal_lm("llama", vocab=60)
    model.forward = torch.compile(model.forward, backend="eager")  # the user's own compile: not wrapped twice
    with pytest.raises(ValueError, match="del model.forward"):
        compile_for_search(model, backend="eager")
    del model.forward
    compile_for_search(model, backend="eager")
    with pytest.raises(ValueError, match="backend"):  # asked again with another backend: say so, don't keep the old
        compile_for_search(model, backend="aot_eager")


def test_compile_for_search_prepares_integer_factor_layouts_for_the_model_dtype():
    # Without cached layouts the compiled graph dequantizes every factor on every call (and, before that fallback,
    # Inductor failed on a float32 model's int8 factors): compile_for_search builds them first.
    from optimum_odllm.lowrank import LowRankLinear, set_submodule
    from optimum_odllm.quantization import QuantizedFactor, QuantizedLowRankLinear
    from optimum_odllm.recsys import compile_for_search

    model = _tiny_causal_lm("llama", vocab=60)
    torch.manual_seed(0)
    for name in ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"):
        dense = model.get_submodule(name)
        lowrank = LowRankLinear(dense.in_features, dense.out_features, 16, bias=False)
        set_submodule(model, name, QuantizedLowRankLinear.from_lowrank(lowrank, None, 8, 128, "rtn"))
    factors = [m for m in model.modules() if isinstance(m, QuantizedFactor)]
    assert len(factors) == 4 and not any(f._prepared for f in factors)
    compile_for_search(model, backend="eager")
    assert all(list(f._prepared) == [(torch.device("cpu"), torch.bfloat16)] for f in factors)  # fp32 -> bf16 on CPU
    del model.forward
    torch._dynamo.reset()


def test_a_copy_of_a_compiled_model_runs_its_own_weights():
    """copy.deepcopy of a compiled model must compute with the copy's weights (it used to call the original's)."""
    import copy

    from optimum_odllm.recsys import compile_for_search

    model = compile_for_search(_tiny_causal_lm("llama", vocab=60), backend="eager")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
        ids = torch.tensor([[3, 4, 5]])
        assert twin(input_ids=ids).logits.abs().sum() == 0  # zero weights: zero logits
        assert model(input_ids=ids).logits.abs().sum() > 0
    torch._dynamo.reset()
