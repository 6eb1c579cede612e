"""LLM-based sequential recommendation (LC-Rec style) to judge OD-LLM compression on ranking quality.

Modules, one idea each: :mod:`.data` (loaders, leave-one-out split), :mod:`.indexing` (RQ-VAE
semantic item codes), :mod:`.instructions` (task templates, index tokens), :mod:`.training`
(``Trainer`` recipe), :mod:`.trie` (prefix trie, constrained beam search), :mod:`.metrics`
(HR@K/NDCG@K), :mod:`.evaluation` (model and popularity evaluation) and :mod:`.compiled` (a compiled
forward for the search on CPU).
"""

from .data import (
    DEFAULT_HISTORY,
    Example,
    LeaveOneOutSplit,
    MalformedDataError,
    RecDataset,
    build_dataset,
    leave_one_out,
    load_amazon_reviews,
    load_interactions_table,
    load_movielens_100k,
    training_examples,
)
from .evaluation import evaluate_popularity, evaluate_recommender, popularity_rankings, recommend
from .indexing import INDEX_FILE, ItemIndex, RQVAE, build_item_index, embed_items, make_unique
from .instructions import (
    PACKED_SEQREC_TEMPLATE,
    SEQREC_TEMPLATES,
    InstructionEncoder,
    Template,
    add_index_tokens,
    build_instruction_samples,
)
from .metrics import ranking_metrics
from .training import build_offline_model, build_offline_tokenizer, load_base_model, train_recommender
from .trie import PrefixTrie, constrained_beam_search

__all__ = [
    "DEFAULT_HISTORY", "Example", "INDEX_FILE", "InstructionEncoder", "ItemIndex", "LeaveOneOutSplit",
    "MalformedDataError", "PACKED_SEQREC_TEMPLATE", "PrefixTrie", "RQVAE", "RecDataset", "SEQREC_TEMPLATES",
    "Template", "add_index_tokens", "build_dataset", "build_instruction_samples", "build_item_index",
    "build_offline_model", "build_offline_tokenizer", "constrained_beam_search", "embed_items",
    "evaluate_popularity", "evaluate_recommender", "leave_one_out", "load_amazon_reviews",
    "load_base_model", "load_interactions_table", "load_movielens_100k", "make_unique",
    "popularity_rankings", "ranking_metrics", "recommend", "train_recommender", "training_examples",
]

from .artifacts import item_index_artifact as _item_index_artifact  # noqa: E402
from ..extensions import register_artifact_hook as _register_artifact_hook  # noqa: E402

_register_artifact_hook("item_index", _item_index_artifact)  # also an entry point; registering twice is harmless

# history-aware decoding, per-user metrics with standard errors, multi-process evaluation
from .evaluation import evaluate_per_user  # noqa: E402
from .history import has_repeats, history_exclusions, seen_items  # noqa: E402
from .metrics import per_user_metrics, ranking_metrics_with_stderr, summarize  # noqa: E402

__all__ += ["evaluate_per_user", "has_repeats", "history_exclusions", "per_user_metrics",
            "ranking_metrics_with_stderr", "seen_items", "summarize"]

# CPU inference: the search with a compiled forward
from .compiled import compile_for_search  # noqa: E402

__all__ += ["compile_for_search"]
