"""R's serialization format and lazy-load databases (.rdx/.rdb), read in pure Python.

Folio reads Jane Austen's novels out of the Debian package of the R data package
`janeaustenr`, where R stores them as a lazy-load database; R itself is not needed.
This module owns the subset of `serialize()` that data needs: vectors (character,
integer, double, logical, complex, raw, list, expression), pairlists with tags,
attributes, symbols, environments, persistent references, the reference table, and
the common ALTREP forms (compact sequences, wrappers). Closures, promises and byte
code are refused with an `RSerializationError` naming the type.

The stream (R Internals, "Serialization formats"), XDR = big-endian:

    "X\n"  int version (2 or 3)  int writer R version  int min reader version
    [v3: int n  n bytes native encoding]
    item := int flags  payload        type = flags & 0xFF, levels = flags >> 12,
                                       has attributes = bit 9, has tag = bit 10

Values map to Python as: NULL -> None; atomic and generic vectors -> `RVector`
(NA -> None, except doubles where NA and NaN are both float('nan')); pairlists ->
`RVector` of type 'pairlist' whose tags are its names; symbols -> `RSymbol`.

A lazy-load database is an index (`.rdx`: one serialized list, stored like an .rds
file: gzip, bzip2, xz or zlib after a 4-byte length) with `variables`, a named list of
(offset, length) pairs into the `.rdb`, where each object is a 4-byte big-endian
uncompressed length, then (for compression types 2 and 3) a type byte, then the
compressed serialization stream.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import EngineError


class RSerializationError(EngineError, ValueError):
    """A byte stream is not an R serialization this reader understands."""


# SEXP types (R's Rinternals.h) and the stream's pseudo-types (serialize.c)
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP = 7, 8, 9, 10, 13, 14, 15
STRSXP, DOTSXP, VECSXP, EXPRSXP, BCODESXP, EXTPTRSXP, WEAKREFSXP, RAWSXP, S4SXP = (
    16, 17, 19, 20, 21, 22, 23, 24, 25)
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP = 255, 254, 253, 252, 251
BASENAMESPACE_SXP, NAMESPACESXP, PACKAGESXP, PERSISTSXP = 250, 249, 248, 247
EMPTYENV_SXP, BASEENV_SXP, ATTRLANGSXP, ATTRLISTSXP, ALTREP_SXP = 242, 241, 240, 239, 238

IS_OBJECT_BIT, HAS_ATTR_BIT, HAS_TAG_BIT = 1 << 8, 1 << 9, 1 << 10
# CHARSXP encoding bits, in `levels`
BYTES_MASK, LATIN1_MASK, UTF8_MASK, ASCII_MASK = 1 << 1, 1 << 2, 1 << 3, 1 << 6
NA_INTEGER = -(2 ** 31)

_VECTOR_TYPES = {LGLSXP: "logical", INTSXP: "integer", REALSXP: "double", CPLXSXP: "complex",
                 STRSXP: "character", VECSXP: "list", EXPRSXP: "expression", RAWSXP: "raw"}
_PAIRLIST_TYPES = {LISTSXP: "pairlist", LANGSXP: "language", DOTSXP: "...",
                   ATTRLISTSXP: "pairlist", ATTRLANGSXP: "language"}
_SINGLETONS = {GLOBALENV_SXP: "R_GlobalEnv", UNBOUNDVALUE_SXP: "R_UnboundValue",
               MISSINGARG_SXP: "R_MissingArg", BASENAMESPACE_SXP: "R_BaseNamespace",
               EMPTYENV_SXP: "R_EmptyEnv", BASEENV_SXP: "R_BaseEnv"}
_REFUSED = {CLOSXP: "closure", PROMSXP: "promise", BCODESXP: "bytecode", EXTPTRSXP: "externalptr",
            WEAKREFSXP: "weakref"}


@dataclass(frozen=True, slots=True)
class RSymbol:
    """An R symbol (a name), e.g. the tag of a pairlist node."""

    name: str


@dataclass(frozen=True, slots=True)
class RSpecial:
    """One of R's singleton objects (R_GlobalEnv, R_EmptyEnv, ...) or a builtin function."""

    name: str


@dataclass(frozen=True, slots=True)
class RReference:
    """A persistent reference (PERSISTSXP): a lazy-load DB's key for an environment."""

    key: tuple[str | None, ...]


@dataclass(eq=False, slots=True)
class REnvironment:
    """An environment: its bindings (frame and hash table merged), enclosure and attributes."""

    frame: dict[str, Any] = field(default_factory=dict)
    enclosure: Any = None
    attributes: dict[str, Any] = field(default_factory=dict)
    locked: bool = False


@dataclass(slots=True)
class RVector:
    """An R vector or pairlist: its R type name ('character', 'list', ...), elements, attributes."""

    type: str
    values: list
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str | None] | None:
        """The `names` attribute as a list of str (None for NA), or None when there is none."""
        n = self.attributes.get("names")
        return list(n.values) if isinstance(n, RVector) else None

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, key: int | str) -> Any:
        """An element by position or by name (the first element of that name)."""
        if isinstance(key, int):
            return self.values[key]
        names = self.names or []
        if key not in names:
            raise KeyError(f"{key!r} is not a name of this {self.type} (names: {names[:20]})")
        return self.values[names.index(key)]

    def to_dict(self) -> dict[str, Any]:
        """{name: element} for a named vector or list; raises ValueError without names."""
        names = self.names
        if names is None:
            raise ValueError(f"this {self.type} of length {len(self)} has no names")
        return {str(n): v for n, v in zip(names, self.values)}


class _Reader:
    """One pass over one XDR serialization stream."""

    def __init__(self, data: bytes) -> None:
        self.buf, self.pos = memoryview(data), 0
        self.refs: list[Any] = []
        self.native_encoding = "utf-8"

    def _take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise RSerializationError(f"stream ends early: {n} bytes wanted at byte {self.pos} "
                                      f"of {len(self.buf)}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def _int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # a long vector: upper and lower 32 bits follow
            hi, lo = struct.unpack(">II", self._take(8))
            n = (hi << 32) | lo
        if n < 0:
            raise RSerializationError(f"negative vector length {n} at byte {self.pos}")
        return n

    def header(self) -> int:
        fmt = bytes(self._take(2))
        if fmt != b"X\n":
            what = {b"A\n": "ASCII", b"B\n": "native binary"}.get(fmt, repr(fmt))
            raise RSerializationError(f"serialization format {what} is not supported: only XDR ('X\\n')")
        version = self._int()
        if version not in (2, 3):
            raise RSerializationError(f"serialization version {version} is not supported: 2 or 3")
        self._int(), self._int()  # writer's R version, minimal reader version
        if version == 3:
            self.native_encoding = _python_encoding(bytes(self._take(self._length())).decode("ascii"))
        return version

    def item(self) -> Any:
        flags = self._int()
        return self._item(flags)

    def _item(self, flags: int) -> Any:
        t = flags & 0xFF
        has_attr = bool(flags & HAS_ATTR_BIT)
        if t == NILVALUE_SXP:
            return None
        if t in _SINGLETONS:
            return RSpecial(_SINGLETONS[t])
        if t == REFSXP:
            i = flags >> 8 or self._int()
            if not 1 <= i <= len(self.refs):
                raise RSerializationError(f"reference {i} at byte {self.pos} is not in the table "
                                          f"of {len(self.refs)} references")
            return self.refs[i - 1]
        if t in (PERSISTSXP, NAMESPACESXP, PACKAGESXP):
            value = RReference(tuple(self._string_vec())) if t == PERSISTSXP else RSpecial(
                ("namespace:" if t == NAMESPACESXP else "package:") + ":".join(map(str, self._string_vec())))
            self.refs.append(value)
            return value
        if t == SYMSXP:
            ch = self.item()  # a CHARSXP
            sym = RSymbol(ch if isinstance(ch, str) else str(ch))
            self.refs.append(sym)
            return sym
        if t == ENVSXP:
            return self._environment(flags)
        if t in _PAIRLIST_TYPES:
            return self._pairlist(flags)
        if t == ALTREP_SXP:
            return self._altrep()
        if t in (SPECIALSXP, BUILTINSXP):
            return RSpecial(bytes(self._take(self._int())).decode("ascii"))
        if t == CHARSXP:
            return self._charsxp(flags)
        if t == S4SXP:
            return RVector("S4", [], self._attributes() if has_attr else {})
        if t in _VECTOR_TYPES:
            vec = RVector(_VECTOR_TYPES[t], self._vector_values(t))
            if has_attr:
                vec.attributes = self._attributes()
            return vec
        name = _REFUSED.get(t, f"type {t}")
        raise RSerializationError(f"cannot read an R {name} (SEXP type {t}) at byte {self.pos - 4}: this "
                                  f"reader handles data (vectors, lists, pairlists, symbols, environments)")

    def _vector_values(self, t: int) -> list:
        n = self._length()
        if t in (STRSXP, VECSXP, EXPRSXP):  # each element is a whole item (a CHARSXP for strings)
            return [self.item() for _ in range(n)]
        if t == RAWSXP:
            return list(bytes(self._take(n)))
        if t in (INTSXP, LGLSXP):
            ints = struct.unpack(f">{n}i", self._take(4 * n))
            if t == INTSXP:
                return [None if v == NA_INTEGER else v for v in ints]
            return [None if v == NA_INTEGER else bool(v) for v in ints]
        if t == REALSXP:
            return list(struct.unpack(f">{n}d", self._take(8 * n)))
        pairs = struct.unpack(f">{2 * n}d", self._take(16 * n))  # CPLXSXP
        return [complex(pairs[2 * i], pairs[2 * i + 1]) for i in range(n)]

    def _charsxp(self, flags: int) -> str | bytes | None:
        n = self._int()
        if n == -1:
            return None  # NA_character_
        raw = bytes(self._take(n))
        levels = flags >> 12
        if levels & BYTES_MASK:
            return raw
        enc = ("utf-8" if levels & UTF8_MASK else "latin-1" if levels & LATIN1_MASK
               else "ascii" if levels & ASCII_MASK else self.native_encoding)
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            # a native string of an unknown locale: keep every byte rather than fail
            return raw.decode("utf-8", errors="replace")

    def _string_vec(self) -> list[str | None]:
        if self._int() != 0:
            raise RSerializationError(f"malformed persistent string vector at byte {self.pos - 4}")
        return [self.item() for _ in range(self._length())]

    def _attributes(self) -> dict[str, Any]:
        pl = self.item()
        if pl is None:
            return {}
        if not isinstance(pl, RVector) or pl.type != "pairlist":
            raise RSerializationError(f"attributes before byte {self.pos} are a {type(pl).__name__}, "
                                      f"not a pairlist")
        return {str(k): v for k, v in zip(pl.names or [], pl.values)}

    def _pairlist(self, flags: int) -> RVector:
        # Iterative over the CDR chain: a long pairlist must not recurse once per node.
        t = flags & 0xFF
        out = RVector(_PAIRLIST_TYPES[t], [])
        tags: list[str | None] = []
        while True:
            if flags & HAS_ATTR_BIT:
                attrs = self._attributes()
                if not out.values:
                    out.attributes.update(attrs)
            tag = self.item() if flags & HAS_TAG_BIT else None
            tags.append(tag.name if isinstance(tag, RSymbol) else None)
            out.values.append(self.item())
            flags = self._int()
            if (flags & 0xFF) == NILVALUE_SXP:
                break
            if (flags & 0xFF) not in _PAIRLIST_TYPES:
                raise RSerializationError(f"a dotted pair (pairlist ending in {flags & 0xFF}) at byte "
                                          f"{self.pos - 4} is not supported")
        if any(tag is not None for tag in tags):
            out.attributes["names"] = RVector("character", tags)
        return out

    def _environment(self, flags: int) -> REnvironment:
        env = REnvironment(locked=bool(self._int()))
        self.refs.append(env)  # before its contents: they may refer back to it
        env.enclosure = self.item()
        for bindings in (self.item(), self.item()):  # the frame, then the hash table
            chains = bindings.values if isinstance(bindings, RVector) and bindings.type == "list" else [bindings]
            for chain in chains:
                if isinstance(chain, RVector):
                    env.frame.update(chain.to_dict())
        attrs = self.item()
        if isinstance(attrs, RVector):
            env.attributes = {str(k): v for k, v in zip(attrs.names or [], attrs.values)}
        return env

    def _altrep(self) -> Any:
        info, state, attrs = self.item(), self.item(), self.item()
        cls = info.values[0].name if isinstance(info, RVector) and isinstance(info.values[0], RSymbol) else "?"
        if cls in ("compact_intseq", "compact_realseq"):
            n, start, step = (state.values if isinstance(state, RVector) else (0, 0, 0))
            seq = [start + i * step for i in range(int(n))]
            vec = RVector("integer", [int(v) for v in seq]) if cls == "compact_intseq" else RVector("double", seq)
        elif cls.startswith("wrap_") and isinstance(state, RVector) and state.values:
            vec = state.values[0]  # (wrapped vector, metadata)
        else:
            raise RSerializationError(f"ALTREP class {cls!r} is not supported: compact_intseq, "
                                      f"compact_realseq and wrap_* are")
        if isinstance(attrs, RVector) and isinstance(vec, RVector):
            vec.attributes = {str(k): v for k, v in zip(attrs.names or [], attrs.values)}
        return vec


def _python_encoding(r_name: str) -> str:
    name = r_name.strip().lower()
    if name in ("latin1", "iso-8859-1", "iso8859-1", "cp1252"):
        return "latin-1"
    return "utf-8"  # "UTF-8", and the usual "unknown"/C locales of data packages


def unserialize(data: bytes) -> Any:
    """The R object of one XDR serialization stream (as R's `unserialize`); raises RSerializationError."""
    r = _Reader(data)
    r.header()
    return r.item()


def decompress_rds(data: bytes) -> bytes:
    """An .rds/.rdx file's serialization stream: gzip, bzip2, xz, zlib after a 4-byte length, or plain."""
    try:
        if data[:2] == b"\x1f\x8b":
            return gzip.decompress(data)
        if data[:3] == b"BZh":
            return bz2.decompress(data)
        if data[:6] == b"\xfd7zXZ\x00":
            return lzma.decompress(data)
        if data[:2] == b"X\n":
            return data
        return _decompress_entry(data, 1)
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise RSerializationError(f"not a readable .rds stream ({type(e).__name__}: {e})") from None


def _decompress_entry(blob: bytes, compressed: int) -> bytes:
    # R_decompress1/2/3 (serialize.c): 4-byte length, then (types 2, 3) a type byte, then the data
    if compressed == 0:
        return blob
    if len(blob) < 5:
        raise RSerializationError(f"a lazy-load entry of {len(blob)} bytes is too short")
    n = struct.unpack(">I", blob[:4])[0]
    kind, body = (b"Z", blob[4:]) if compressed == 1 else (blob[4:5], blob[5:])
    try:
        if kind == b"Z":
            out = zlib.decompress(body)
        elif kind == b"2":
            out = bz2.decompress(body)
        elif kind == b"X":
            out = lzma.decompress(body)
        elif kind == b"0":
            out = bytes(body)
        else:
            raise RSerializationError(f"unknown lazy-load compression type byte {kind!r}: Z, 2, X or 0")
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise RSerializationError(f"a lazy-load entry does not decompress ({type(e).__name__}: {e})") from None
    if len(out) != n:
        raise RSerializationError(f"a lazy-load entry decompressed to {len(out)} bytes, its header says {n}")
    return out


class LazyLoadDB:
    """An R lazy-load database: `.rdx` index + `.rdb` data (e.g. a package's data/Rdata.rdb).

    `LazyLoadDB("…/data/Rdata")` (the common base name) or the .rdx path. Raises
    FileNotFoundError when a file is missing, RSerializationError when the index is malformed.
    """

    def __init__(self, base: str | Path) -> None:
        base = Path(base)
        stem = base.with_suffix("") if base.suffix in (".rdx", ".rdb") else base
        self.rdx, self.rdb = stem.with_name(stem.name + ".rdx"), stem.with_name(stem.name + ".rdb")
        for p in (self.rdx, self.rdb):
            if not p.is_file():
                raise FileNotFoundError(f"lazy-load database file {str(p)!r} does not exist")
        index = unserialize(decompress_rds(self.rdx.read_bytes()))
        if not isinstance(index, RVector) or index.type != "list" or "variables" not in (index.names or []):
            raise RSerializationError(f"{self.rdx} is not a lazy-load index (a list with 'variables')")
        variables = index["variables"]
        self._where: dict[str, tuple[int, int]] = {}
        for name, pos in (variables.to_dict().items() if isinstance(variables, RVector) and variables.values else ()):
            if not isinstance(pos, RVector) or len(pos) != 2:
                raise RSerializationError(f"{self.rdx}: the position of {name!r} is not (offset, length)")
            self._where[name] = (int(pos.values[0]), int(pos.values[1]))
        # TRUE: zlib (R_compress1); 2: bzip2; 3: xz; FALSE: stored as is
        c = index["compressed"].values[0] if "compressed" in index.names else True
        self.compressed = 1 if c is True or c is None else int(c)

    def names(self) -> list[str]:
        """The names of the objects stored, in the index's order."""
        return list(self._where)

    def get(self, name: str) -> Any:
        """The object stored under `name`; raises KeyError listing the names if absent."""
        if name not in self._where:
            raise KeyError(f"{name!r} is not in {self.rdx.name}: it holds {self.names()}")
        offset, length = self._where[name]
        with open(self.rdb, "rb") as f:
            f.seek(offset)
            blob = f.read(length)
        if len(blob) != length:
            raise RSerializationError(f"{self.rdb.name}: {name!r} wants bytes {offset}..{offset + length}, "
                                      f"the file ends at {offset + len(blob)}")
        return unserialize(_decompress_entry(blob, self.compressed))
