"""Bad input to the `folio` command line, systematically: each case must exit 2 with a one-line
message (`folio CMD: error: ...`, no traceback) saying what was wrong, and the store it was pointed
at must read back bit-exact (every block checksummed before and after; its files unchanged).

Documents that are binary, not UTF-8 (hypothesis draws the bytes), empty, missing or a directory;
stream names with path separators or control characters; stores that are a file, whose
zarr.json / commit.json / index are truncated or garbage, or that another model wrote; unknown
streams to ask; bad budgets and waits. Empty and enormous lines are valid text: they ingest.
The number of cases tried is printed.
"""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from memory_store import StoreConfig, TieredStore
from memory_store.writer_lock import LOCK_NAME
from train.cli import main

MODEL = "random:tiny:3"
OTHER_MODEL = "random:small:3"  # another layout: 8 layers, 4 KV heads
CASES: Counter = Counter()
FUZZ = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def block_digests(path: Path) -> dict[str, list[str]]:
    cfg = StoreConfig(device="cpu", device_budget_bytes=0, host_budget_bytes=0, index_backend="exact")
    with TieredStore.open(path, "r", config=cfg) as r:
        out = {}
        for s in r.streams():
            ids = r.stream_blocks(s).tolist()
            out[s] = [hashlib.sha256(k.contiguous().view(torch.uint8).numpy().tobytes()
                                     + v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                      for k, v in (r.get_layer(ids, layer) for layer in range(r.layout.n_layers))]
        return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    doc = d / "emma.txt"
    doc.write_text("Emma Woodhouse, handsome, clever, and rich, with a comfortable home. " * 12)
    store = d / "store"
    assert main(["ingest", "--model", MODEL, "--store", str(store), "--no-progress", str(doc)]) == 0
    return d, store, tree(store), block_digests(store)


def refused(capsys, kind: str, argv: list[str], says: str | None = None) -> str:
    """`folio argv` must exit 2 with one line on stderr; returns that line."""
    CASES[kind] += 1
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    except Exception as e:  # noqa: BLE001 - the point: it escaped main(), a traceback for the user
        raise AssertionError(f"{kind}: {argv[0]} raised {type(e).__name__}: {e}") from e
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, f"{kind}: exit {rc}, stderr {err!r}"
    assert len(lines) == 1 and lines[0].startswith(f"folio {argv[0]}: error: "), f"{kind}: stderr {err!r}"
    if says is not None:
        assert says.lower() in lines[0].lower(), f"{kind}: {says!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def intact(base):
    """The base store afterwards: files unchanged and every block the same."""
    _, store, files, digests = base
    yield store
    assert tree(store) == files, "a refused command changed the store's files"
    assert block_digests(store) == digests


def _ingest(store: Path, *files, extra=()) -> list[str]:
    return ["ingest", "--model", MODEL, "--store", str(store), "--no-progress", *extra, *map(str, files)]


# -- documents ------------------------------------------------------------------------------------------------
@FUZZ
@given(data=st.binary(min_size=1, max_size=300), at=st.integers(0, 300))
def test_binary_documents(capsys, intact, tmp_path, data, at):
    f = tmp_path / "blob.bin"
    f.write_bytes(data[:at] + b"\x00" + data[at:])
    refused(capsys, "binary document", _ingest(intact, f), says="binary")


@FUZZ
@given(text=st.text(max_size=40), bad=st.binary(min_size=1, max_size=8).filter(lambda b: b"\x00" not in b))
def test_documents_that_are_not_utf8(capsys, intact, tmp_path, text, bad):
    raw = text.encode() + b"\xff" + bad  # 0xff never appears in UTF-8
    f = tmp_path / "latin.txt"
    f.write_bytes(raw)
    refused(capsys, "non-UTF-8 document", _ingest(intact, f), says="UTF-8")


def test_empty_missing_and_directory_documents(capsys, intact, tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    good = tmp_path / "good.txt"
    good.write_text("fine text " * 20)
    refused(capsys, "empty document", _ingest(intact, tmp_path / "empty.txt"), says="empty.txt")
    refused(capsys, "missing document", _ingest(intact, tmp_path / "nope.txt"), says="nope.txt")
    refused(capsys, "directory as document", _ingest(intact, tmp_path), says=str(tmp_path))
    # a bad file among good ones: refused before anything is ingested
    refused(capsys, "bad document among good", _ingest(intact, good, tmp_path / "nope.txt"), says="nope.txt")


def test_empty_and_enormous_lines_are_text(capsys, tmp_path):
    store = tmp_path / "s"
    (tmp_path / "lines.txt").write_text("\n" * 50)
    (tmp_path / "long.txt").write_text("x" * 6_000)  # one line, no newline (ingest has no line limit)
    for name in ("lines.txt", "long.txt"):
        CASES["edge text ingested"] += 1
        assert main(_ingest(store, tmp_path / name)) == 0
    with TieredStore.open(store, "r") as r:
        assert r.streams() == ["lines.txt", "long.txt"] and len(r.stream_blocks("long.txt")) > 90


# -- stream names ---------------------------------------------------------------------------------------------
@FUZZ
@given(name=st.one_of(
    st.builds(lambda a, b: f"{a}/{b}", st.text(min_size=1, max_size=6), st.text(max_size=6)),
    st.builds(lambda a, c: a + c, st.text(max_size=6), st.sampled_from(["\n", "\t", "\x00", "\x1b[2J", "\x7f", "\\"])),
))
@example(name="-/")  # found by CI: a name that looks like an option
@example(name="--help\n")
def test_stream_names_with_separators_or_control_characters(capsys, intact, base, name):
    # `--stream=NAME`: a name may begin with "-", which argparse would otherwise read as an option
    refused(capsys, "bad stream name", _ingest(intact, base[0] / "emma.txt", extra=(f"--stream={name}",)),
            says="stream")


def test_ask_an_unknown_stream(capsys, intact):
    refused(capsys, "unknown stream", ["ask", "--model", MODEL, "--store", str(intact), "--stream", "nope",
                                       "--max-tokens", "2", "who?"], says="nope")


# -- stores ----------------------------------------------------------------------------------------------------
def test_a_store_that_is_a_file_or_missing(capsys, tmp_path, base):
    f = tmp_path / "plain.txt"
    f.write_text("not a store")
    doc = base[0] / "emma.txt"
    refused(capsys, "store is a file", _ingest(f, doc), says=str(f))
    refused(capsys, "store is a file", ["ask", "--model", MODEL, "--store", str(f), "hi"], says=str(f))
    refused(capsys, "store is a file", ["store", "inspect", str(f)], says=str(f))
    refused(capsys, "missing store", ["ask", "--model", MODEL, "--store", str(tmp_path / "none"), "hi"])
    refused(capsys, "missing store", ["store", "inspect", str(tmp_path / "none")])
    assert f.read_text() == "not a store"


def test_a_store_written_by_another_model(capsys, intact, base):
    doc = base[0] / "emma.txt"
    refused(capsys, "another model's store", ["ingest", "--model", OTHER_MODEL, "--store", str(intact),
                                              "--no-progress", "--stream", "x", str(doc)], says="layout")
    refused(capsys, "another model's store", ["ask", "--model", OTHER_MODEL, "--store", str(intact), "hi"],
            says="layout")


def _metadata_files(store: Path) -> list[str]:
    # (the arrays' own zarr.json: tests/memory_store/test_fuzz_api.py)
    return sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file() and p.name != LOCK_NAME
                  and (p.parent == store and p.suffix == ".json" or "index" in str(p.relative_to(store))))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncated_and_garbage_store_files(capsys, base, tmp_path_factory, data):
    d, store, files, digests = base
    victim = data.draw(st.sampled_from(_metadata_files(store)), label="file")
    original = (store / victim).read_bytes()
    how = data.draw(st.sampled_from(["truncate", "garbage", "empty"]), label="how")
    new = {"truncate": original[:data.draw(st.integers(0, max(0, len(original) - 1)), label="length")],
           "garbage": data.draw(st.binary(min_size=1, max_size=100), label="bytes"), "empty": b""}[how]
    copy = tmp_path_factory.mktemp("bad") / "store"
    shutil.copytree(store, copy)
    (copy / victim).write_bytes(new)
    for argv in (["store", "inspect", str(copy)], ["ask", "--model", MODEL, "--store", str(copy), "--max-tokens",
                                                   "1", "hi"],
                 _ingest(copy, d / "emma.txt", extra=("--stream", "more"))):
        CASES[f"damaged {Path(victim).name}"] += 1
        capsys.readouterr()
        try:
            rc = main(argv)
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"{victim} {how}: {argv[0]} raised {type(e).__name__}: {e}") from e
        err = capsys.readouterr().err.strip().splitlines()
        if rc == 0:  # only a derived file (the index: rebuilt) may be damaged and the command still work
            assert "index" in victim, f"{victim} {how}: {argv[0]} succeeded on a damaged store"
            continue
        assert rc == 2 and len(err) == 1 and err[0].startswith(f"folio {argv[0]}: error: "), \
            f"{victim} {how}: {argv[0]} exit {rc}, stderr {err}"
        if argv[0] == "ingest":
            (copy / victim).write_bytes(original)  # the refused writer changed nothing else
            after = tree(copy)
            changed = sorted(k for k in set(files) | set(after) if files.get(k) != after.get(k))
            assert all("index" in k for k in changed), f"{victim} {how}: the refused ingest changed {changed}"
            assert block_digests(copy) == digests
    shutil.rmtree(copy.parent)


# -- flags ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,says", [(("--device-budget", "lots"), "--device-budget"),
                                        (("--host-budget=-5GiB",), "--host-budget"),
                                        (("--wait", "-1"), "wait"), (("--wait", "nan"), "wait")])
def test_bad_budgets_and_waits(capsys, intact, base, flags, says):
    refused(capsys, "bad flag", _ingest(intact, base[0] / "emma.txt", extra=flags), says=says)


def test_zz_cases_counted(capsys):
    total = sum(CASES.values())
    with capsys.disabled():
        print(f"\nCLI fuzz: {total} bad-input cases, each exit 2 with one line and the store bit-exact: "
              + ", ".join(f"{k} {n}" for k, n in sorted(CASES.items())))
    assert total > 80
