"""engine.runtime: jemalloc is preloaded by re-executing `folio` when the machine has it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.runtime import TRAINING_CONF, find_jemalloc, preload_env

FOLIO = Path(sys.executable).parent / "folio"


def test_preload_env_choices(tmp_path):
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    env = preload_env({"FOLIO_MALLOC": str(lib), "LD_PRELOAD": "/x/other.so"})
    assert env["LD_PRELOAD"] == f"{lib} /x/other.so" and env["FOLIO_MALLOC_ACTIVE"] == str(lib)
    assert preload_env(env) is None  # the re-executed process does not re-execute again
    assert preload_env({"FOLIO_MALLOC": "system"}) is None
    assert preload_env({"FOLIO_MALLOC": str(lib), "LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) is None
    with pytest.raises(ValueError, match="no such file"):
        find_jemalloc({"FOLIO_MALLOC": str(tmp_path / "missing.so")})


def test_training_conf_is_set_unless_the_user_set_one(tmp_path):
    """Training re-executes with jemalloc keeping freed pages (TRAINING_CONF); a MALLOC_CONF
    the user set wins; other commands get jemalloc's defaults."""
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    base = {"FOLIO_MALLOC": str(lib)}
    assert preload_env(base, conf=TRAINING_CONF)["MALLOC_CONF"] == TRAINING_CONF
    assert "dirty_decay_ms:5000" in TRAINING_CONF and "muzzy_decay_ms:5000" in TRAINING_CONF
    assert preload_env({**base, "MALLOC_CONF": "narenas:2"}, conf=TRAINING_CONF)["MALLOC_CONF"] == "narenas:2"
    assert "MALLOC_CONF" not in preload_env(base)


@pytest.mark.skipif(not FOLIO.exists() or not sys.platform.startswith("linux"), reason="needs the installed folio script")
def test_folio_reexecutes_with_the_preloaded_library():
    """The console script re-executes itself with the library preloaded and still works
    (libc itself stands in for jemalloc where the machine has none); a bad path is a
    clear error, exit code 2."""
    import ctypes.util

    libc = next((p for p in ("/lib/x86_64-linux-gnu/libc.so.6", "/lib/aarch64-linux-gnu/libc.so.6",
                             "/lib64/libc.so.6") if os.path.exists(p)), None)
    lib = find_jemalloc({}) or libc
    if lib is None:
        pytest.skip(f"no library to preload ({ctypes.util.find_library('c')})")
    env = {**os.environ, "FOLIO_MALLOC": lib}
    env.pop("FOLIO_MALLOC_ACTIVE", None)
    code = ("import os, sys; sys.argv[0] = os.environ['FOLIO_SCRIPT']; "
            "from engine.runtime import maybe_reexec; maybe_reexec(sys.argv); "
            "print('ACTIVE=' + os.environ.get('FOLIO_MALLOC_ACTIVE', ''), 'PRELOAD=' + os.environ.get('LD_PRELOAD', ''))")
    script = Path(os.environ.get("TMPDIR", "/tmp")) / f"folio-alloc-{os.getpid()}.py"
    script.write_text(code)
    try:
        out = subprocess.run([sys.executable, str(script)], env={**env, "FOLIO_SCRIPT": str(script)},
                             capture_output=True, text=True, timeout=120)
    finally:
        script.unlink()
    assert out.returncode == 0, out.stderr
    assert f"ACTIVE={lib}" in out.stdout and lib in out.stdout.split("PRELOAD=")[1]
    help_ = subprocess.run([str(FOLIO), "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0 and "ingest" in help_.stdout, help_.stderr
    bad = subprocess.run([str(FOLIO), "--help"], env={**env, "FOLIO_MALLOC": "/nope/libjemalloc.so"},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "FOLIO_MALLOC" in bad.stderr and "no such file" in bad.stderr


def test_auto_finds_the_copy_in_the_virtual_environment(tmp_path, monkeypatch):
    """With no system jemalloc, 'auto' picks the copy scripts/fetch_jemalloc.sh puts in
    <prefix>/lib; with neither, it returns None (the system allocator)."""
    import engine.runtime as allocator

    monkeypatch.setattr(allocator, "_CANDIDATES", (str(tmp_path / "absent.so"),))
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(allocator.sys, "prefix", str(tmp_path))
    if not sys.platform.startswith("linux"):
        pytest.skip("the allocator switch is Linux only")
    assert find_jemalloc({}) is None
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libjemalloc.so.2").write_bytes(b"")
    assert find_jemalloc({}) == str(tmp_path / "lib" / "libjemalloc.so.2")
    assert preload_env({})["LD_PRELOAD"] == str(tmp_path / "lib" / "libjemalloc.so.2")


def test_page_decay_switches_at_run_time():
    """set_page_decay changes jemalloc's decay for every arena in a running process (the demo
    hands training's kept pages back before its long ingests); without jemalloc: a no-op."""
    from engine.runtime import active, page_decay, set_page_decay

    if active() != "jemalloc":
        assert page_decay() is None and set_page_decay(10_000, 0) is False
    lib = find_jemalloc({})
    if lib is None or not sys.platform.startswith("linux"):
        pytest.skip("no jemalloc on this machine")
    code = ("from engine.runtime import page_decay, set_page_decay, _huge_arena, _mallctl, JEMALLOC_DEFAULT_DECAY_MS as D\n"
            "import torch\n"
            "x = [torch.empty(1 << 20) for _ in range(64)] + [torch.empty(8 << 20)]; del x\n"
            "h = _huge_arena(_mallctl())\n"
            "print(page_decay()); print(set_page_decay(*D)); print(page_decay())\n"
            "print(page_decay(0), page_decay(h))\n")
    env = {**os.environ, "LD_PRELOAD": lib, "MALLOC_CONF": TRAINING_CONF}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    # every arena back to jemalloc's defaults; its arena of huge allocations purges eagerly (0)
    assert out.stdout.split("\n")[:4] == ["(5000, 5000)", "True", "(10000, 0)", "(10000, 0) (0, 0)"], out.stdout


@pytest.mark.parametrize("malloc_conf,inside", [(None, "(5000, 5000)"), ("narenas:4", "(10000, 0)")])
def test_training_phase_keeps_pages_unless_malloc_conf_is_set(malloc_conf, inside):
    """A process that has jemalloc without folio's re-execution (preloaded by a container,
    torchrun) keeps freed pages inside `training_phase` (train runs in it) and returns to its
    previous decay after; a MALLOC_CONF the user set is left alone."""
    lib = find_jemalloc({})
    if lib is None or not sys.platform.startswith("linux"):
        pytest.skip("no jemalloc on this machine")
    code = ("from engine.runtime import training_phase, page_decay, _huge_arena, _mallctl\n"
            "import torch\n"
            "x = torch.empty(8 << 20); del x\n"  # jemalloc's arena of huge allocations exists
            "h = _huge_arena(_mallctl())\n"
            "with training_phase():\n    print(page_decay())\nprint(page_decay())\nprint(page_decay(h))\n")
    env = {**os.environ, "LD_PRELOAD": lib}
    env.pop("MALLOC_CONF", None)
    if malloc_conf:
        env["MALLOC_CONF"] = malloc_conf
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == [inside, "(10000, 0)", "(0, 0)"], out.stdout
