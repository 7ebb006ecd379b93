"""Built-in synthetic documents: the paper's passkey task and associative recall.

Both are pure functions of a `random.Random`, so document i of a run is the same on
every machine. Filler text is drawn from many sentence templates and word lists (the
paper's five sentences among them), so a model cannot learn to skip one fixed pattern.

Passkey format (the Landmark Attention paper's): intro + filler + "The pass key is K.
Remember it. K is the pass key." + filler + "What is the pass key? The pass key is",
and for training the answer " K." follows. Keys are 1..50000 as in the paper, or, with
`key_digits=(lo, hi)`, a digit count drawn from lo..hi and then a key of that many
digits (so short and 5-digit keys, up to 99999, are all seen in training).
"""

from __future__ import annotations

import random

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. "
                 "Find it and memorize them. I will quiz you about the important information there.")
PASSKEY_QUESTION = "What is the pass key? The pass key is"
PAPER_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                "There and back again.")

_NOUNS = ("grass", "sky", "sun", "river", "mountain", "city", "garden", "road", "tree", "window",
          "house", "bridge", "forest", "lake", "cloud", "stone", "field", "harbor", "tower", "valley",
          "market", "library", "train", "ship", "lamp", "door", "wind", "moon", "sea", "hill")
_ADJS = ("green", "blue", "yellow", "quiet", "old", "bright", "calm", "tall", "wide", "warm", "cold",
         "narrow", "busy", "empty", "red", "grey", "gentle", "distant", "small", "large")
_NAMES = ("Anna", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
          "Kofi", "Lena", "Marta", "Nils", "Olga", "Pablo", "Rosa", "Sami", "Tara", "Umar")
_VERBS = ("walked to", "looked at", "painted", "visited", "remembered", "passed", "crossed",
          "described", "photographed", "left")
_TIMES = ("In the morning", "At noon", "In the evening", "Later", "After a while", "Once again",
          "On Sunday", "Before dawn", "Every day", "Now")
_TEMPLATES = (
    "The {noun} is {adj}.",
    "{Name} {verb} the {noun}.",
    "{Time}, the {noun} was {adj}.",
    "A {adj} {noun} stood near the {noun2}.",
    "{Name} said that the {noun} looked {adj}.",
    "Nobody knew why the {noun} was so {adj}.",
    "{Time}, {Name} {verb} the {adj} {noun}.",
    "The {noun2} and the {noun} were both {adj}.",
    "It was a {adj} day by the {noun}.",
    "{Name} and {Name2} {verb} the {noun2}.",
)


def filler_sentence(rng: random.Random) -> str:
    """One sentence of irrelevant text: a paper sentence or a filled template."""
    if rng.random() < 0.2:
        return rng.choice(PAPER_FILLER)
    return rng.choice(_TEMPLATES).format(
        noun=rng.choice(_NOUNS), noun2=rng.choice(_NOUNS), adj=rng.choice(_ADJS),
        Name=rng.choice(_NAMES), Name2=rng.choice(_NAMES), verb=rng.choice(_VERBS),
        Time=rng.choice(_TIMES))


def filler(rng: random.Random, n_chars: int) -> str:
    """At least `n_chars` characters (when n_chars > 0) of space-separated filler sentences."""
    parts: list[str] = []
    total = 0
    while total < n_chars:
        s = filler_sentence(rng)
        parts.append(s)
        total += len(s) + 1
    return " ".join(parts)


def random_key(rng: random.Random, key_digits: tuple[int, int] | None = None) -> int:
    """A passkey: 1..50000 (the paper) when key_digits is None, else a key whose digit
    count is drawn uniformly from key_digits=(lo, hi) (1 <= lo <= hi <= 12)."""
    if key_digits is None:
        return rng.randint(1, 50000)
    lo, hi = key_digits
    if not 1 <= lo <= hi <= 12:
        raise ValueError(f"key_digits={key_digits!r} is invalid: (lo, hi) with 1 <= lo <= hi <= 12")
    n = rng.randint(lo, hi)
    return rng.randint(10 ** (n - 1), 10 ** n - 1)


_DISTRACTOR_LABELS = ("door code", "room number", "order number", "total", "score", "account number",
                      "street number", "ticket number", "page")


def distractor_sentence(rng: random.Random, key: int) -> str:
    """A sentence holding numbers that are not the pass key (never the key, never the words
    "pass key"): a labelled number, a numbered heading, a year, a count or a price. Real text
    has numbers in it (section numbers, dates, figures); a model that answers with the first
    number it finds fails there."""
    def num(lo: int = 1, hi: int = 7) -> int:
        while True:
            n = random_key(rng, (lo, hi))
            if n != key:
                return n

    kind = rng.randrange(6)
    if kind == 0:
        return f"The {rng.choice(_DISTRACTOR_LABELS)} is {num()}."
    if kind == 1:
        return f"{num(1, 2)}. {rng.choice(('Definitions', 'Conditions', 'Terms', 'Notes', 'Remarks'))}."
    if kind == 2:
        return f"In {rng.randrange(1700, 2030)} there were {num()} of them."
    if kind == 3:
        return f"Section {num(1, 3)} applies."
    if kind == 4:
        return f"It cost {num()} pounds and {num(1, 2)} pence."
    return f"See item {num(1, 4)} and item {num(1, 4)}."


def passkey_prompt(rng: random.Random, n_chars: int, *, depth: float | None = None,
                   key: int | None = None, key_digits: tuple[int, int] | None = None,
                   prose=None, distractors: tuple[int, int] = (0, 0)) -> tuple[str, str]:
    """A passkey prompt of about `n_chars` characters and its answer.

    depth in [0, 1] places the key sentence that far into the filler (random if None);
    key: the pass key (random if None, see `random_key` for key_digits); distractors
    (lo, hi): that many (uniform) `distractor_sentence`s at random places of the filler.
    Returns (prompt, answer) where the prompt ends with PASSKEY_QUESTION and the answer is " K.".
    """
    if key is None:
        key = random_key(rng, key_digits)
    if depth is None:
        depth = rng.random()
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r} is invalid: must be in [0, 1]")
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    budget = max(0, n_chars - len(PASSKEY_INTRO) - len(needle) - len(PASSKEY_QUESTION) - 8)
    if prose is not None:  # real text around the key (a `train.prose_tasks.ProseHay`): whole sentences
        _, text = prose.excerpt(rng, max(1, budget))
        sents = [x for x in text.split(". ") if x]
        cut = int(round(len(sents) * depth))
        before, after = ". ".join(sents[:cut]), ". ".join(sents[cut:])
        if before and not before.endswith((".", "!", "?", '"')):
            before += "."
    else:
        before = filler(rng, int(budget * depth))
        after = filler(rng, budget - len(before))
    n_dis = rng.randint(*distractors) if distractors[1] else 0
    if n_dis:
        before, after = _insert_sentences(rng, before, after, [distractor_sentence(rng, key) for _ in range(n_dis)])
    pieces = [PASSKEY_INTRO, before, needle, after, PASSKEY_QUESTION]
    prompt = " ".join(p for p in pieces if p)
    return prompt, f" {key}."


def _insert_sentences(rng: random.Random, before: str, after: str, extra: list[str]) -> tuple[str, str]:
    """Put each sentence of `extra` at a random sentence boundary of before + after (the key
    sits between them): (before, after) with them inserted."""
    parts = [[x.rstrip(".") for x in t.split(". ")] if t else [] for t in (before, after)]
    for sent in extra:
        side = parts[0] if (rng.random() < 0.5 and parts[0]) or not parts[1] else parts[1]
        side.insert(rng.randint(0, len(side)), sent.rstrip("."))
    out = []
    for p in parts:
        text = ". ".join(x for x in p if x)
        if text and not text.endswith((".", "!", "?", '"')):
            text += "."
        out.append(text)
    return out[0], out[1]


def passkey_document(rng: random.Random, n_chars: int, *,
                     key_digits: tuple[int, int] | None = None, prose=None) -> str:
    """A passkey training document: the prompt followed by its answer."""
    prompt, answer = passkey_prompt(rng, n_chars, key_digits=key_digits, prose=prose)
    return prompt + answer


_KEY_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def recall_document(rng: random.Random, n_chars: int, *, n_queries: int = 4) -> str:
    """An associative-recall document: key/value facts among filler, then queries.

    "Remember what each key holds." then facts "Key qzm holds 4821." separated by filler
    sentences, then for some keys "What does qzm hold? qzm holds 4821." The number of
    facts grows with the length; keys are unique three-letter words.
    """
    n_facts = max(2, n_chars // 120)
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < n_facts:
        k = "".join(rng.choice(_KEY_ALPHABET) for _ in range(3))
        if k not in seen:
            seen.add(k)
            keys.append(k)
    values = [rng.randint(0, 9999) for _ in keys]
    parts = ["Remember what each key holds."]
    per_gap = max(0, (n_chars - 60 * n_facts) // (n_facts + 1))
    for k, v in zip(keys, values):
        gap = filler(rng, per_gap)
        if gap:
            parts.append(gap)
        parts.append(f"Key {k} holds {v}.")
    for i in rng.sample(range(n_facts), min(n_queries, n_facts)):
        parts.append(f"What does {keys[i]} hold? {keys[i]} holds {values[i]}.")
    return " ".join(parts)


_REPEAT_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
REPEAT_CUE = " Once more: "


def repeat_document(rng: random.Random, n_chars: int) -> tuple[str, tuple[int, int]]:
    """A copy task: random words, then the same words again after a cue.

    "Copy this: kq3 zt 81x ... Once more: kq3 zt 81x ..." — every character of the
    second copy is predictable only by finding where the same text came before (an
    induction lookup, the skill a passkey answer needs), so this gives a dense signal
    for it; the first copy is incompressible noise. Returns (text, (start, end)) where
    the span is the second copy (its answer, for `answer_weight`).
    """
    half = max(8, (n_chars - 24) // 2)
    words: list[str] = []
    total = 0
    while total < half:
        w = "".join(rng.choice(_REPEAT_ALPHABET) for _ in range(rng.randint(2, 5)))
        words.append(w)
        total += len(w) + 1
    body = " ".join(words) + "."
    head = "Copy this: " + body + REPEAT_CUE
    return head + body, (len(head), len(head) + len(body))
