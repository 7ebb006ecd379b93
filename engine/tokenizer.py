"""Tokenizers: Folio's byte-level one (tiny presets) and a checkpoint's own (`tokenizers`).

`ByteTokenizer`: ids 0..255 are the bytes of UTF-8 text; 256..259 are PAD, BOS, EOS and
LANDMARK. Decoding drops special tokens and replaces invalid UTF-8 with U+FFFD.

`HFTokenizer`: a pretrained checkpoint's `tokenizer.json` through the `tokenizers`
library, with Folio's landmark token added as one new special token after every existing
id (the model gains one embedding row for it; no existing id changes). It renders the
checkpoint's chat template (Jinja, from `tokenizer_config.json`) for questions.

Both satisfy the `Tokenizer` protocol the inference code uses; `load_tokenizer(dir)`
picks the one a model directory needs.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

LANDMARK_TOKEN = "<|folio_landmark|>"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


class Tokenizer(Protocol):
    """What inference and evaluation need of a tokenizer."""

    vocab_size: int

    @property
    def landmark_id(self) -> int: ...
    @property
    def bos_id(self) -> int | None: ...
    @property
    def eos_id(self) -> int | None: ...
    @property
    def pad_id(self) -> int: ...
    def encode(self, text: str, *, bos: bool = False, eos: bool = False, specials: bool = False) -> list[int]: ...
    def encode_offsets(self, text: str, *, specials: bool = False) -> tuple[list[int], list[tuple[int, int]]]: ...
    def decode(self, ids: Iterable[int], *, keep_special: bool = False) -> str: ...
    def never_sampled(self) -> list[int]: ...
    def stream_decoder(self) -> "StreamDecoder": ...
    def chat_prompt(self, question: str) -> str | None: ...
    def chat_parts(self) -> tuple[str, str] | None: ...


class StreamDecoder(Protocol):
    def push(self, token: int) -> str:
        """Text completed by this token (may be '' while a character is split)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes plus special tokens. `vocab_size` is 260."""

    PAD = 256
    BOS = 257
    EOS = 258
    LANDMARK = 259
    vocab_size = 260
    special_names = {PAD: "<pad>", BOS: "<bos>", EOS: "<eos>", LANDMARK: "<lm>"}

    @property
    def pad_id(self) -> int:
        return self.PAD

    @property
    def bos_id(self) -> int:
        return self.BOS

    @property
    def eos_id(self) -> int:
        return self.EOS

    @property
    def landmark_id(self) -> int:
        return self.LANDMARK

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, specials: bool = False) -> list[int]:
        """Text -> token ids (no landmarks; see `engine.landmarks.insert_landmarks`). Text never
        holds special tokens here (`specials` is accepted for the protocol)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        if bos:
            ids.insert(0, self.BOS)
        if eos:
            ids.append(self.EOS)
        return ids

    def encode_offsets(self, text: str, *, specials: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, the (start, end) character range of `text` each id comes from)."""
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        for i, ch in enumerate(text):
            b = ch.encode("utf-8")
            ids.extend(b)
            spans.extend([(i, i + 1)] * len(b))
        return ids, spans

    def decode(self, ids: Iterable[int], *, keep_special: bool = False) -> str:
        """Token ids -> text. Special tokens are dropped unless `keep_special`."""
        out = bytearray()
        parts: list[str] = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} out of range; allowed 0..{self.vocab_size - 1}")
            if i < 256:
                out.append(i)
            elif keep_special:
                parts.append(out.decode("utf-8", errors="replace"))
                out = bytearray()
                parts.append(self.special_names[i])
        parts.append(out.decode("utf-8", errors="replace"))
        return "".join(parts)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Ordinary byte tokens only, as raw bytes (for streaming decode)."""
        return bytes(int(i) for i in ids if int(i) < 256)

    def never_sampled(self) -> list[int]:
        """Ids decoding never produces: the special tokens (decode ordinary bytes only)."""
        return [self.PAD, self.BOS, self.EOS, self.LANDMARK]

    def stream_decoder(self) -> "StreamDecoder":
        return _ByteStream()

    def chat_prompt(self, question: str) -> str | None:
        return None  # the byte-level models have no chat format

    def chat_parts(self) -> tuple[str, str] | None:
        return None


class _ByteStream:
    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds split characters

    def push(self, token: int) -> str:
        return self._dec.decode(bytes([token])) if token < 256 else ""


class _TextStream:
    """Streaming decode for subword tokenizers: decode the text so far, emit what is new
    (a token can complete a character begun by the previous ones)."""

    def __init__(self, tok: "HFTokenizer") -> None:
        self.tok, self.ids, self.text = tok, [], ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for the rest
            return ""
        new, self.text = text[len(self.text):], text
        return new


class HFTokenizer:
    """A checkpoint's `tokenizer.json` with Folio's landmark token appended.

    tokenizer_json: the JSON text. model_vocab: the checkpoint's embedding rows before the
    landmark (may exceed the tokenizer's own ids: padded vocabularies); the landmark gets id
    model_vocab, so `vocab_size` is model_vocab + 1. config: tokenizer_config.json's fields
    (bos_token, eos_token, chat_template, add_bos_token) when present.
    """

    def __init__(self, tokenizer_json: str, *, model_vocab: int, config: dict | None = None):
        from tokenizers import Tokenizer as _Tok

        data = json.loads(tokenizer_json)
        added = [t for t in data.get("added_tokens", []) if t.get("content") == LANDMARK_TOKEN]
        if added and added[0]["id"] != model_vocab:
            raise ValueError(f"tokenizer.json has {LANDMARK_TOKEN} at id {added[0]['id']}, but the model's "
                             f"landmark row is {model_vocab}")
        if not added:
            base = _Tok.from_str(tokenizer_json).get_vocab_size()
            if base > model_vocab:
                raise ValueError(f"tokenizer.json has {base} ids but the model only {model_vocab} embedding rows")
            # the library numbers added tokens after its own ids: rows of a padded vocabulary
            # (embedding rows past the tokenizer's ids) get placeholders so the landmark lands
            # on the model's new row
            extra = [f"<|folio_unused_{i}|>" for i in range(base, model_vocab)] + [LANDMARK_TOKEN]
            data.setdefault("added_tokens", []).extend(
                {"id": base + j, "content": c, "single_word": False, "lstrip": False,
                 "rstrip": False, "normalized": False, "special": True} for j, c in enumerate(extra))
        self._tok = _Tok.from_str(json.dumps(data))
        if self._tok.token_to_id(LANDMARK_TOKEN) != model_vocab:
            raise ValueError(f"could not place {LANDMARK_TOKEN} at id {model_vocab} (tokenizer has "
                             f"{self._tok.get_vocab_size()} ids)")
        self.json = json.dumps(data, ensure_ascii=False)
        self.config = dict(config or {})
        self.vocab_size = model_vocab + 1
        self._landmark = model_vocab
        self._bos = self._special_id("bos_token")
        self._eos = self._special_id("eos_token")
        self._specials = sorted({t["id"] for t in data["added_tokens"] if t.get("special")})

    def _special_id(self, key: str) -> int | None:
        v = self.config.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        return self._tok.token_to_id(v) if isinstance(v, str) else None

    @property
    def landmark_id(self) -> int:
        return self._landmark

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int | None:
        return self._eos

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, specials: bool = False) -> list[int]:
        """Text -> ids, as the checkpoint's tokenizer gives them (its post-processor's special
        tokens left out: `bos`/`eos` add them explicitly). specials: parse special-token
        strings (a rendered chat template); by default they are ordinary text, so a document
        that contains e.g. the landmark's name cannot insert a landmark."""
        if not isinstance(text, str):
            raise ValueError(f"text must be str, got {type(text).__name__}")
        self._tok.encode_special_tokens = not specials
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if bos and self._bos is not None:
            ids.insert(0, self._bos)
        if eos and self._eos is not None:
            ids.append(self._eos)
        return ids

    @property
    def pad_id(self) -> int:
        """Filler for the unused tail of a training window (never a target: the windows mask
        padding by position): the checkpoint's pad token, else its EOS, else 0."""
        pad = self._special_id("pad_token")
        return pad if pad is not None else (self._eos if self._eos is not None else 0)

    def encode_offsets(self, text: str, *, specials: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, the (start, end) character range of `text` each id comes from), the ids
        equal to `encode(text, specials=specials)`."""
        if not isinstance(text, str):
            raise ValueError(f"text must be str, got {type(text).__name__}")
        self._tok.encode_special_tokens = not specials
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids: Iterable[int], *, keep_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} out of range; allowed 0..{self.vocab_size - 1}")
        return self._tok.decode(ids, skip_special_tokens=not keep_special)

    def never_sampled(self) -> list[int]:
        """The landmark (inserted, never predicted) and ids past the tokenizer's own."""
        unused = [t["id"] for t in json.loads(self.json)["added_tokens"]
                  if t["content"].startswith("<|folio_unused_")]
        return [self._landmark] + unused

    def stream_decoder(self) -> "StreamDecoder":
        return _TextStream(self)

    def chat_parts(self) -> tuple[str, str] | None:
        """(before, after) the user's text in one user turn ready for the assistant's answer
        (the template rendered around a marker), or None without a template. A long document
        ingested after `before` can then be asked about with question + `after`."""
        marker = "\x00FOLIO_USER_TEXT\x00"
        text = self.chat_prompt(marker)
        if text is None or text.count(marker) != 1:
            return None
        before, after = text.split(marker)
        return before, after

    def chat_prompt(self, question: str) -> str | None:
        """`question` as one user turn of the checkpoint's chat template, ready for the
        assistant's answer; None when the checkpoint has no template."""
        template = self.config.get("chat_template")
        if not template:
            return None
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg):
            raise ValueError(f"chat template: {msg}")

        env.globals["raise_exception"] = raise_exception
        tok = lambda key: self.config.get(key) if isinstance(self.config.get(key), str) else ""  # noqa: E731
        return env.from_string(template).render(
            messages=[{"role": "user", "content": question}], add_generation_prompt=True,
            bos_token=tok("bos_token"), eos_token=tok("eos_token"))

    def save(self, directory: str | os.PathLike, *, defaults: dict | None = None) -> None:
        """Write tokenizer.json (landmark included) and tokenizer_config.json (`defaults`: fields
        written when the checkpoint's config has none of its own)."""
        d = Path(directory)
        (d / TOKENIZER_FILE).write_text(self.json, encoding="utf-8")
        cfg = {**(defaults or {}), **self.config, "folio_landmark_token": LANDMARK_TOKEN,
               "folio_landmark_id": self._landmark}
        (d / TOKENIZER_CONFIG).write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_tokenizer(directory: str | os.PathLike, *, model_vocab: int | None = None) -> "ByteTokenizer | HFTokenizer":
    """The tokenizer of a Folio model directory: its tokenizer.json when present (model_vocab:
    the embedding rows before the landmark, i.e. the model's vocab_size - 1), else the byte
    tokenizer."""
    d = Path(directory)
    if not (d / TOKENIZER_FILE).is_file():
        return ByteTokenizer()
    cfg_path = d / TOKENIZER_CONFIG
    config = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    if model_vocab is None:
        if "folio_landmark_id" not in config:
            raise ValueError(f"{d}: tokenizer_config.json has no folio_landmark_id; pass model_vocab")
        model_vocab = int(config["folio_landmark_id"])
    return HFTokenizer((d / TOKENIZER_FILE).read_text(encoding="utf-8"), model_vocab=model_vocab, config=config)
