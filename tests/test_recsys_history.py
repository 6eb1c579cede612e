"""History-aware decoding: seen items are excluded inside the constrained beam search, and error bars."""

from __future__ import annotations

import math

import pytest
import torch
from test_recsys_core import _TableLM  # a fake LM whose next-token log-probs are a hand-set table

from optimum_odllm.recsys.data import Example
from optimum_odllm.recsys.evaluation import popularity_rankings
from optimum_odllm.recsys.history import has_repeats, history_exclusions, seen_items
from optimum_odllm.recsys.metrics import per_user_metrics, ranking_metrics, ranking_metrics_with_stderr
from optimum_odllm.recsys.trie import PrefixTrie, constrained_beam_search


# --------------------------------------------------------------------------- hand-computed 2-level example
# items A=(1,3) B=(1,4) C=(2,3) D=(2,4); after the prompt's last token 0: P(1)=.6, P(2)=.4;
# after 1: P(3)=.9, P(4)=.1; after 2: P(3)=.7, P(4)=.3.  Scores: A .54 > C .28 > D .12 > B .06.
A, B, C, D = range(4)


def _hand_model() -> tuple[_TableLM, PrefixTrie]:
    vocab = 6
    probs = torch.full((vocab, vocab), 1e-9)
    probs[0, 1], probs[0, 2] = 0.6, 0.4
    probs[1, 3], probs[1, 4] = 0.9, 0.1
    probs[2, 3], probs[2, 4] = 0.7, 0.3
    return _TableLM(probs.log()), PrefixTrie([(1, 3), (1, 4), (2, 3), (2, 4)])


@pytest.mark.parametrize(
    "beams, exclude, expected",
    [
        (2, set(), [A, C]),       # plain beam search: B (.06) is pruned at step 2 behind A and C
        (4, set(), [A, C, D, B]),
        (2, {A}, [C, D]),         # filtering [A, C] afterwards would leave only [C]
        (2, {A, C}, [D, B]),
        (2, {A, B}, [C, D]),      # prefix (1,) has no unseen completion: never entered
        (3, {C, D}, [A, B, -1]),  # only two unseen items exist
        (2, {A, B, C, D}, [-1, -1]),
    ],
)
def test_masked_beam_search_matches_hand_computed_ranking(beams, exclude, expected):
    model, trie = _hand_model()
    ranked, scores = constrained_beam_search(model, torch.tensor([[0]]), trie, num_beams=beams, exclude=[exclude])
    assert ranked[0] == expected
    probs = {A: 0.54, B: 0.06, C: 0.28, D: 0.12}
    want = [math.log(probs[i]) if i >= 0 else float("-inf") for i in expected]
    assert torch.allclose(scores[0], torch.tensor(want), atol=1e-5)


def test_exclusion_is_per_prompt_in_one_batch():
    model, trie = _hand_model()
    prompts = torch.tensor([[0], [0], [0]])
    ranked, _ = constrained_beam_search(model, prompts, trie, num_beams=2, exclude=[{A}, set(), {C, D}])
    assert ranked == [[C, D], [A, C], [A, B]]
    unmasked, _ = constrained_beam_search(model, prompts, trie, num_beams=2)
    assert unmasked == [[A, C]] * 3


# ------------------------------------------------------------------------------- random 3-level example
ITEMS = [(1, 4, 7), (1, 4, 8), (1, 5, 7), (2, 4, 9), (3, 6, 6), (3, 6, 10), (2, 5, 11), (3, 5, 7), (1, 6, 9)]


def _random_model(seed: int = 0) -> _TableLM:
    generator = torch.Generator().manual_seed(seed)
    return _TableLM(torch.randn(12, 12, generator=generator) * 3)


def _reference_search(logp: torch.Tensor, last: int, trie: PrefixTrie, beams: int, seen: set[int]) -> list[int]:
    """Beam search in plain Python where a prefix is only entered if some unseen item completes it."""
    def open_(prefix):
        return any(trie.item(s) not in seen for s in ITEMS if s[: len(prefix)] == prefix)

    kept = [((), 0.0)]
    for _ in range(trie.length):
        cands = [(p + (t,), s + float(logp[p[-1] if p else last, t]))
                 for p, s in kept for t in trie.allowed(p).tolist() if open_(p + (t,))]
        kept = sorted(cands, key=lambda x: -x[1])[:beams]
    return [trie.item(p) for p, _ in kept]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_masked_search_equals_unmasked_minus_seen(seed):
    """With beams wider than any level of the trie the search is exhaustive: masking == removing seen items."""
    model, trie = _random_model(seed), PrefixTrie(ITEMS)
    prompts = torch.tensor([[0, 11], [2, 3], [10, 9]])
    exclude = [{0, 3}, {4, 5, 7}, set(range(len(ITEMS))) - {2}]
    masked, _ = constrained_beam_search(model, prompts, trie, num_beams=len(ITEMS), exclude=exclude)
    unmasked, _ = constrained_beam_search(model, prompts, trie, num_beams=len(ITEMS))
    for row, seen in enumerate(exclude):
        unseen_order = [i for i in unmasked[row] if i not in seen]
        assert masked[row] == unseen_order + [-1] * len(seen)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_narrow_masked_search_returns_num_beams_unseen_items(seed):
    model, trie = _random_model(seed), PrefixTrie(ITEMS)
    prompts = torch.tensor([[0, 11], [2, 3], [10, 9], [5, 1]])
    beams = 3
    unmasked, _ = constrained_beam_search(model, prompts, trie, num_beams=beams)
    # exclude exactly what the unmasked search returned: filtering afterwards would leave nothing
    exclude = [set(r) for r in unmasked]
    masked, _ = constrained_beam_search(model, prompts, trie, num_beams=beams, exclude=exclude)
    logp = torch.log_softmax(model.table.detach(), -1)
    for row, seen in enumerate(exclude):
        assert len(masked[row]) == beams and len(set(masked[row])) == beams
        assert not set(masked[row]) & seen and min(masked[row]) >= 0
        assert masked[row] == _reference_search(logp, int(prompts[row, -1]), trie, beams, seen)


def test_exclusion_of_unknown_item_is_refused():
    model, trie = _hand_model()
    with pytest.raises(ValueError, match="item 9"):
        constrained_beam_search(model, torch.tensor([[0]]), trie, num_beams=2, exclude=[{9}])
    with pytest.raises(ValueError, match="one set of items per prompt"):
        constrained_beam_search(model, torch.tensor([[0]]), trie, num_beams=2, exclude=[set(), set()])


# ----------------------------------------------------------------------------------- which items are seen
def test_seen_items_are_training_sequence_plus_history():
    train = {"u": [1, 2, 3], "v": [4]}
    examples = [Example("u", (2, 3, 5), 6), Example("w", (7,), 8)]
    assert seen_items(train, examples) == [{1, 2, 3, 5}, {7}]


def test_history_exclusion_default_follows_repeats():
    no_repeats = {"u": [1, 2, 3], "v": [3, 1]}
    repeats = {"u": [1, 2, 1], "v": [3]}
    examples = [Example("u", (2, 3), 9)]
    assert not has_repeats(no_repeats) and has_repeats(repeats)
    assert history_exclusions(no_repeats, examples) == [{1, 2, 3}]  # auto: on
    assert history_exclusions(repeats, examples) is None  # auto: off, users do re-consume items
    assert history_exclusions(no_repeats, examples, exclude_history=False) is None
    assert history_exclusions(repeats, examples, exclude_history=True) == [{1, 2, 3}]
    with pytest.raises(ValueError, match="train="):
        history_exclusions(None, examples, exclude_history=True)
    assert history_exclusions(None, examples) is None


def test_popularity_baseline_uses_the_same_seen_items():
    train = {"u": [1, 2, 2], "v": [2, 3], "w": [3, 4]}
    examples = [Example("u", (1, 2, 5), 9)]
    ranked = popularity_rankings(train, examples, k=3)[0]
    assert ranked == [3, 4]  # 2, 1 and 5 are seen; 5 is unpopular anyway
    assert not set(ranked) & seen_items(train, examples)[0]


# ------------------------------------------------------------------------------------------ error bars
def test_per_user_metrics_and_standard_error_by_hand():
    rankings = [["a", "b"], ["x", "y", "z"], ["p"], ["q", "a"]]
    targets = ["a", "z", "c", "a"]  # ranks 0, 2, absent, 1
    per_user = per_user_metrics(rankings, targets)
    assert per_user["HR@1"] == [1.0, 0.0, 0.0, 0.0]
    assert per_user["NDCG@5"] == pytest.approx([1.0, 0.5, 0.0, 1 / math.log2(3)])
    m = ranking_metrics_with_stderr(rankings, targets)
    assert m["HR@5"] == pytest.approx(0.75)
    # sample standard deviation of (1, 1, 0, 1) is 0.5; s.e. = 0.5 / sqrt(4)
    assert m["HR@5_se"] == pytest.approx(0.25)
    ndcg = [1.0, 0.5, 0.0, 1 / math.log2(3)]
    mean = sum(ndcg) / 4
    se = math.sqrt(sum((x - mean) ** 2 for x in ndcg) / 3) / 2
    assert m["NDCG@10"] == pytest.approx(mean) and m["NDCG@10_se"] == pytest.approx(se)
    assert {k: v for k, v in m.items() if not k.endswith("_se")} == ranking_metrics(rankings, targets)


def test_standard_error_needs_two_users():
    with pytest.raises(ValueError, match="at least 2 users"):
        ranking_metrics_with_stderr([["a"]], ["a"])


def test_evaluate_module_reports_standard_errors():
    evaluate = pytest.importorskip("evaluate")
    from optimum_odllm.metrics import RANKING_METRIC_PATH

    predictions, references = [["3", "7", "1"], ["1", "2"], ["9"]], ["7", "9", "9"]
    got = evaluate.load(RANKING_METRIC_PATH).compute(predictions=predictions, references=references, with_stderr=True)
    assert got == pytest.approx(ranking_metrics_with_stderr(predictions, references))
    # HR@5 per user (1, 0, 1): mean 2/3, sample std sqrt(1/3), s.e. sqrt(1/3) / sqrt(3) = 1/3
    assert got["HR@5_se"] == pytest.approx(1 / 3)
