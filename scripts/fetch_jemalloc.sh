#!/usr/bin/env bash
# Put jemalloc beside the virtual environment when the machine has none (called by `make install`;
# run it by hand, `bash scripts/fetch_jemalloc.sh .venv`, to add it to an existing environment).
# Why: the `folio` command runs on jemalloc when it finds it, which keeps a long ingest's peak RSS
# flat (glibc's malloc fragments; see engine/runtime.py and BENCHMARKS.md). On Debian/Ubuntu the
# library is one package: `apt-get download` fetches it without installing anything, and only
# libjemalloc.so.2 is unpacked into VENV/lib. A machine with no package lists yet gets them
# refreshed once (`apt-get update`, root only). Never fatal, and every network step is bounded
# (60 s): without it folio runs on the system allocator.
set -u
VENV="${1:-.venv}"
DEST="$VENV/lib/libjemalloc.so.2"
# already there (the system's, or this environment's copy)? engine/runtime.py decides, as at run time
"$VENV/bin/python" -c 'import sys; from engine.runtime import find_jemalloc; sys.exit(find_jemalloc({}) is None)' \
    2>/dev/null && exit 0
command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1 || {
    echo "fetch_jemalloc: no apt-get here; folio will use the system allocator" >&2; exit 0; }
tmp="$(mktemp -d 2>/dev/null)" && [ -n "$tmp" ] && [ -d "$tmp" ] || {
    echo "fetch_jemalloc: no temporary directory; folio will use the system allocator" >&2; exit 0; }
trap 'rm -rf "$tmp"' EXIT
fetch() { (cd "$tmp" && timeout 60 apt-get download -q libjemalloc2 >/dev/null 2>&1); }
fetch || { [ "$(id -u)" = 0 ] && timeout 60 apt-get update -qq >/dev/null 2>&1 && fetch; }
if ls "$tmp"/libjemalloc2_*.deb >/dev/null 2>&1 && dpkg-deb -x "$tmp"/libjemalloc2_*.deb "$tmp/x" 2>/dev/null; then
    lib="$(find "$tmp/x" -name 'libjemalloc.so.2' | head -n 1)"
    if [ -n "$lib" ]; then
        mkdir -p "$VENV/lib" && cp "$lib" "$DEST" && echo "fetch_jemalloc: $DEST" && exit 0
    fi
fi
echo "fetch_jemalloc: could not fetch libjemalloc2; folio will use the system allocator" >&2
exit 0
