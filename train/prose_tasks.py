"""Retrieval tasks hidden in real prose: the training data of landmark fine-tuning.

A document is an excerpt of a real training text (Austen's novels except the held-out one,
the State of the Union addresses outside the held-out years, the standard library outside
its held-out files: `engine.corpora.training_documents`, so the evaluation's texts never
appear) with one to `max_keys` key sentences at random depths, then a question about one
of them and its answer. The other keys are distractors of the same kind with another label
(RULER's multi-key needles), so the model must retrieve the block that holds the key asked
for, not any key-shaped string.

The phrasings, labels, key vocabularies and question wordings here are deliberately not
the evaluation's (`engine.needle`): its needle sentence ("The pass key is 48213. Remember
it. ..."), its word list and its code pattern never occur in training, so the evaluation
measures retrieval of a fact the model was never shown in that form.

With a chat template (`chat=(before, after)` of `Tokenizer.chat_parts`) the document is one
user turn (excerpt + question) and the answer is the assistant's reply, as the evaluation
asks; without one (byte-level models) the question and answer follow as plain text. A
`plain` share of documents is the excerpt alone: ordinary language modelling on real text.
"""

from __future__ import annotations

import random
import re
from collections import OrderedDict
from collections.abc import Sequence

from engine import corpora
from engine.needle import KEY_PATTERNS, WORDS as EVAL_WORDS

HAY_CORPORA = ("austen", "sotu", "stdlib")

# labels of facts; each kind has its own key generator
_NUMBER_LABELS = ("combination of the safe", "room number", "ticket number", "magic number", "PIN",
                  "order number", "account number", "locker number", "serial number", "lucky number")
_WORD_LABELS = ("password", "code word", "secret word of the club", "name of the ship",
                "name of the horse", "watchword", "name of the cat", "hidden word")
_CODE_LABELS = ("licence plate", "booking reference", "tracking code", "product key", "gate code",
                "voucher code")
_TRAIN_WORDS = ("apricot", "badger", "compass", "dandelion", "emerald", "falcon", "gondola", "harpoon",
                "iceberg", "juniper", "kettle", "lantern", "mango", "nutmeg", "otter", "pelican",
                "quartz", "rhubarb", "sapphire", "tangerine", "umbrella", "velvet", "windmill", "yak",
                "anchor", "blizzard", "cobalt", "dragonfly", "eucalyptus", "fjord", "glacier", "hazelnut",
                "indigo", "jasmine", "kiwi", "lobster", "magnolia", "nightingale", "orchid", "paprika",
                "raven", "saffron", "tulip", "vanilla", "walnut", "zebra", "bamboo", "cinnamon")
_COLOURS = ("crimson", "turquoise", "amber", "violet", "scarlet", "ochre", "teal", "magenta")
_STATEMENTS = (
    "The {label} is {key}.",
    "Please note: the {label} is {key}.",
    "Important: the {label} is {key}. Do not forget it.",
    "By the way, the {label} is {key}.",
    "Write this down, the {label} is {key}.",
    "({label}: {key})",
    "Remember that the {label} is {key}.",
    "Keep in mind that the {label} is {key}.",
)
_QUESTIONS = (
    "What is the {label}?",
    "What was the {label} mentioned in the text?",
    "Tell me the {label}.",
    "Which {label} was given above?",
    "Somewhere in the text a {label} is given. What is it?",
)
_ANSWERS = ("The {label} is {key}.", "{key}", "The {label} mentioned is {key}.")
_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"

assert not set(_TRAIN_WORDS) & set(EVAL_WORDS), "training words must not be the evaluation's"


def _number(rng: random.Random) -> str:
    n = rng.randint(3, 8)
    return str(rng.randrange(10 ** (n - 1), 10 ** n))


def _word(rng: random.Random) -> str:
    return rng.choice(_TRAIN_WORDS + _COLOURS)


def _code(rng: random.Random) -> str:
    L, d = (lambda: rng.choice(_LETTERS)), (lambda: str(rng.randrange(10)))
    shape = rng.choice(("LL-dddd", "dLLd", "LLLdd", "dd-LLL-d"))
    key = "".join(L() if c == "L" else d() if c == "d" else c for c in shape)
    # never the evaluation's own code shape (K7Q-42M)
    return key if re.fullmatch(KEY_PATTERNS["code"], key) is None else key + d()


KINDS = {"number": (_NUMBER_LABELS, _number), "word": (_WORD_LABELS, _word), "code": (_CODE_LABELS, _code)}

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class ProseHay:
    """Excerpts of the training split of real corpora, cut at sentence boundaries."""

    def __init__(self, corpora_names: Sequence[str] = HAY_CORPORA, *, cache_dir=None) -> None:
        self.names: list[str] = []
        for c in corpora_names:
            try:
                names = corpora.training_documents(c, cache_dir=cache_dir)
            except corpora.CorpusError:
                names = []
            if c == "stdlib":
                names = names[::25]  # a sample of the library's files: prose dominates the mixture
            self.names.extend(names)
        if not self.names:
            self.names = corpora.training_documents("sample")
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._cache_dir = cache_dir

    def _text(self, name: str) -> str:
        if name not in self._cache:
            self._cache[name] = corpora.load(name, cache_dir=self._cache_dir)
            while len(self._cache) > 8:
                self._cache.popitem(last=False)
        self._cache.move_to_end(name)
        return self._cache[name]

    def excerpt(self, rng: random.Random, n_chars: int) -> tuple[str, str]:
        """(document name, about n_chars characters of it starting at a sentence). Documents
        shorter than n_chars are joined with the next ones drawn."""
        parts, total, names = [], 0, []
        while total < 0.8 * n_chars:
            name = rng.choice(self.names)
            text = self._text(name)
            if name.startswith("stdlib:"):
                start = 0
            else:
                text = " ".join(text.split())  # hard line wraps are not structure
                start = rng.randrange(max(1, len(text) - n_chars))
                m = _SENTENCE_END.search(text, start)
                start = m.end() if m and m.end() < len(text) else 0
            piece = text[start:start + n_chars - total]
            cut = piece.rfind(". ")
            if cut > len(piece) // 2:
                piece = piece[:cut + 1]
            parts.append(piece)
            names.append(name)
            total += len(piece) + 1
        return "+".join(names), " ".join(parts)


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text) if s]


def needle_document(rng: random.Random, hay: ProseHay, n_chars: int, *, max_keys: int = 3,
                    chat: tuple[str, str] | None = None, plain: float = 0.0
                    ) -> tuple[str, str, tuple[int, int] | None]:
    """(name, text, answer span) of one training document of about n_chars characters."""
    name, text = hay.excerpt(rng, n_chars)
    if rng.random() < plain:
        return name, text, None
    kind = rng.choice(tuple(KINDS))
    labels_pool, make = KINDS[kind]
    n_keys = rng.randint(1, min(max_keys, len(labels_pool)))
    labels = rng.sample(labels_pool, n_keys)
    keys: list[str] = []
    for _ in labels:
        k = make(rng)
        while k in keys:
            k = make(rng)
        keys.append(k)
    sents = _sentences(text)
    slots = sorted(rng.randint(0, len(sents)) for _ in labels)
    for j, (slot, label, key) in reversed(list(enumerate(zip(slots, labels, keys)))):
        sents.insert(slot, rng.choice(_STATEMENTS).format(label=label, key=key))
    asked = rng.randrange(n_keys)
    label, key = labels[asked], keys[asked]
    question = rng.choice(_QUESTIONS).format(label=label)
    answer = rng.choice(_ANSWERS).format(label=label, key=key)
    body = " ".join(sents)
    if chat is not None:
        before, after = chat
        prompt = f"{before}{body}\n\n{question}{after}"
    else:
        prompt = f"{body}\n\nQuestion: {question}\nAnswer: "
    a = len(prompt)
    return f"{name}#{kind}{n_keys}", prompt + answer, (a, a + len(answer))
