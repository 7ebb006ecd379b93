"""Byte-level tokenizer with four special tokens; nothing to download.

Ids 0..255 are the bytes of UTF-8 text; 256..259 are PAD, BOS, EOS and LANDMARK.
Decoding drops special tokens and replaces invalid UTF-8 with U+FFFD.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


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

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Text -> token ids (no landmarks; see `engine.landmarks.insert_landmarks`)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        if bos:
            ids.insert(0, self.BOS)
        if eos:
            ids.append(self.EOS)
        return ids

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
