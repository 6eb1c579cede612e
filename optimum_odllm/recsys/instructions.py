"""Instruction data (LC-Rec tasks), index tokens in the tokenizer, and an offline word-level tokenizer.

A :class:`Template` is a prompt and a response with placeholders ``{history}``, ``{item}`` and
``{title}``. Text pieces are tokenized with the tokenizer; item placeholders are mapped straight to
the ids of their index tokens, so an item is always exactly ``levels`` tokens regardless of how the
tokenizer would split the surrounding text. Labels are ``-100`` on the prompt (loss on the response).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

from .data import DEFAULT_HISTORY, Example, training_examples
from .indexing import ItemIndex
from .trie import PrefixTrie


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
_PLACEHOLDER = re.compile(r"\{(history|item|title)\}")


@dataclass(frozen=True)
class Template:
    """One instruction: ``prompt`` -> ``response``; both may contain ``{history}``, ``{item}``, ``{title}``."""

    prompt: str
    response: str


#: LC-Rec's sequential recommendation task (history -> next item), a few paraphrases.
SEQREC_TEMPLATES = (
    Template("The user has interacted with items {history} in chronological order. "
             "Can you predict the next possible item that the user may expect?", "{item}"),
    Template("Here are the user's historical interactions: {history}, try to recommend another item to the user.",
             "{item}"),
    Template("Based on the items that the user has interacted with: {history}, "
             "can you determine what item would be recommended to the user next?", "{item}"),
)
#: Item <-> index alignment tasks of LC-Rec.
ITEM2INDEX_TEMPLATES = (
    Template("Which item has the title: {title}?", "{item}"),
    Template("An item is called {title}, can you tell me which item it is?", "{item}"),
)
INDEX2ITEM_TEMPLATES = (
    Template("What is the title of item {item}?", "{title}"),
    Template("Please tell me what item {item} is called.", "{title}"),
)
#: Short template for CPU training from scratch. The response is the whole item sequence: with a
#: causal mask, position t only sees the items before it, so one sequence of n items trains the same
#: next-item predictions as its n-1 sliding windows, ~n times cheaper. At test time the prompt is
#: ``history : <items>`` and the model continues with the next item.
PACKED_SEQREC_TEMPLATE = Template("history :", "{history}")
SHORT_ITEM2INDEX_TEMPLATE = Template("title : {title} item :", "{item}")
SHORT_INDEX2ITEM_TEMPLATE = Template("item : {item} title :", "{title}")


class InstructionEncoder:
    """Turns templates + items into token ids, with the item index tokens mapped directly."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, index: ItemIndex, item_text: Sequence[str]):
        missing = [t for t in index.all_tokens() if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"{len(missing)} index tokens (e.g. {missing[0]}) are not in the tokenizer: "
                             "call add_index_tokens first")
        self.tokenizer = tokenizer
        self.index = index
        self.item_text = list(item_text)
        self.item_ids = [tokenizer.convert_tokens_to_ids(index.item_tokens(i)) for i in range(len(index.codes))]
        self._text_cache: dict[str, list[int]] = {}
        self._trie: tuple[list[list[int]], PrefixTrie] | None = None

    @property
    def trie(self) -> PrefixTrie:
        """The prefix trie of every item's token ids, built once (a per-request build cost more than ranking one
        user on ML-100K) and rebuilt if ``item_ids`` is replaced or edited."""
        if self._trie is None or self._trie[0] != self.item_ids:
            self._trie = ([list(ids) for ids in self.item_ids], PrefixTrie(self.item_ids))
        return self._trie[1]

    def _text(self, text: str) -> list[int]:
        text = text.strip()
        if not text:
            return []
        if text not in self._text_cache:
            self._text_cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._text_cache[text]

    def render(self, text: str, history: Sequence[int] = (), item: int | None = None) -> list[int]:
        """Token ids of ``text`` with placeholders filled."""
        ids: list[int] = []
        pos = 0
        for m in _PLACEHOLDER.finditer(text):
            ids += self._text(text[pos:m.start()])
            if m.group(1) == "history":
                for h in history:
                    ids += self.item_ids[h]
            elif m.group(1) == "item":
                ids += self.item_ids[item]
            else:
                ids += self._text(self.item_text[item])
            pos = m.end()
        return ids + self._text(text[pos:])

    def prompt_ids(self, template: Template, history: Sequence[int] = (), item: int | None = None) -> list[int]:
        """BOS + prompt; for the packed template the history is appended (the model continues it)."""
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        ids = bos + self.render(template.prompt, history, item)
        if template == PACKED_SEQREC_TEMPLATE:
            ids += self.render(template.response, history)
        return ids

    def sample(self, template: Template, history: Sequence[int] = (), item: int | None = None) -> dict:
        """``input_ids`` and ``labels`` (prompt masked with -100, EOS appended to the response)."""
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        prompt = bos + self.render(template.prompt, history, item)
        response = self.render(template.response, history, item) + [self.tokenizer.eos_token_id]
        return {"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response}


def packed_sequences(train: dict[str, list[int]], history: int = DEFAULT_HISTORY, stride: int | None = None) -> list[list[int]]:
    """Chunks of ``history + 1`` items of every training prefix (overlapping by ``history + 1 - stride``).

    Every training position is covered, each with up to ``history`` preceding items in its chunk.
    """
    stride = stride or (history + 1) // 2
    chunks = []
    for seq in train.values():
        if len(seq) < 2:
            continue
        starts = list(range(0, max(1, len(seq) - history), stride))
        if starts[-1] + history + 1 < len(seq):
            starts.append(len(seq) - history - 1)
        chunks += [seq[s : s + history + 1] for s in starts]
    return chunks


def build_instruction_samples(encoder: InstructionEncoder, train: dict[str, list[int]], tasks: Iterable[str] = ("seqrec",),
                              history: int = DEFAULT_HISTORY, seed: int = 0, packed: bool = False,
                              short: bool = False) -> list[dict]:
    """Training samples for the chosen LC-Rec tasks (``seqrec``, ``item2index``, ``index2item``).

    ``packed=True`` uses :data:`PACKED_SEQREC_TEMPLATE` over :func:`packed_sequences`; otherwise every
    sliding window gets a random paraphrase from :data:`SEQREC_TEMPLATES`. ``short=True`` uses the short
    alignment templates (cheaper on CPU).
    """
    rng = random.Random(seed)
    samples = []
    tasks = list(tasks)
    if "seqrec" in tasks:
        if packed:
            samples += [encoder.sample(PACKED_SEQREC_TEMPLATE, history=c) for c in packed_sequences(train, history)]
        else:
            for ex in training_examples(train, history):
                samples.append(encoder.sample(rng.choice(SEQREC_TEMPLATES), ex.history, ex.target))
    n_items = len(encoder.item_ids)
    if "item2index" in tasks:
        for i in range(n_items):
            samples.append(encoder.sample(SHORT_ITEM2INDEX_TEMPLATE if short else rng.choice(ITEM2INDEX_TEMPLATES), item=i))
    if "index2item" in tasks:
        for i in range(n_items):
            samples.append(encoder.sample(SHORT_INDEX2ITEM_TEMPLATE if short else rng.choice(INDEX2ITEM_TEMPLATES), item=i))
    unknown = set(tasks) - {"seqrec", "item2index", "index2item"}
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}")
    rng.shuffle(samples)
    return samples


def add_index_tokens(tokenizer: PreTrainedTokenizerBase, index: ItemIndex, model=None) -> int:
    """Add the ``<a_k>``-style tokens to the tokenizer and resize the model's embeddings; return how many were new."""
    added = tokenizer.add_tokens(index.all_tokens())
    if model is not None and model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return added


def train_word_tokenizer(texts: Iterable[str], vocab_size: int = 2000, min_frequency: int = 2):
    """Offline word-level tokenizer (lower-cased) trained here with ``tokenizers``; no download needed."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def template_texts() -> list[str]:
    """All fixed template words (to include in the offline tokenizer's training text)."""
    out = []
    for t in (*SEQREC_TEMPLATES, *ITEM2INDEX_TEMPLATES, *INDEX2ITEM_TEMPLATES, PACKED_SEQREC_TEMPLATE,
              SHORT_ITEM2INDEX_TEMPLATE, SHORT_INDEX2ITEM_TEMPLATE):
        out += [_PLACEHOLDER.sub(" ", t.prompt), _PLACEHOLDER.sub(" ", t.response)]
    return out * 2  # clear min_frequency=2


def eval_prompts(encoder: InstructionEncoder, examples: Sequence[Example], template: Template) -> list[list[int]]:
    """Prompt ids for each evaluation example (history only; the target is what is predicted)."""
    return [encoder.prompt_ids(template, ex.history) for ex in examples]
