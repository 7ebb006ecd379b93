"""Engine subcommands of the `folio` CLI: ingest, ask, generate, eval passkey, store inspect.

The root parser lives in `train/cli.py` (train sits on top of the import order), which
calls `add_engine_commands` to register these. Each command parses, builds a config,
and calls one function.

--model takes an exported model directory (`folio export`: model.safetensors +
config.json) or `random:PRESET[:SEED]`, a randomly initialised model (for testing the
plumbing before a model is trained).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def load_model_arg(spec: str):
    """An exported model directory, or random:PRESET[:SEED]."""
    import torch

    from engine.checkpoint import load_model
    from engine.config import preset
    from engine.model import LandmarkTransformer

    if spec.startswith("random:"):
        parts = spec.split(":")
        seed = int(parts[2]) if len(parts) > 2 else 0
        torch.manual_seed(seed)
        return LandmarkTransformer(preset(parts[1])).eval()
    if not Path(spec).is_dir():
        raise FileNotFoundError(f"--model {spec!r}: no such directory (expected an exported model "
                                f"from `folio export`, or random:PRESET)")
    return load_model(spec)


def _retrieval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--top-k", type=int, default=4, help="blocks retrieved per layer and KV head (default 4)")
    p.add_argument("--local-blocks", type=int, default=2, help="complete blocks kept in the local window")
    p.add_argument("--positions", choices=("stingy", "true"), default="stingy",
                   help="positions of retrieved blocks (default stingy: a short prefix)")
    p.add_argument("--selection", choices=("chunk", "token"), default="chunk",
                   help="one choice per chunk (max over its queries) or per token")
    p.add_argument("--chunk", type=int, default=None,
                   help="prefill chunk in positions (default: the model's window minus the local blocks, "
                        "384 for a 512-position window)")
    p.add_argument("--device-budget", default="512MiB", help="device tier budget (e.g. 512MiB)")
    p.add_argument("--host-budget", default="2GiB", help="host tier budget (e.g. 2GiB)")


def _retrieval_config(args):
    from engine.retrieval import RetrievalConfig

    return RetrievalConfig(top_k=args.top_k, local_blocks=args.local_blocks, positions=args.positions,
                           selection=args.selection, chunk_len=args.chunk)


def _store_config(args):
    from memory_store import StoreConfig

    from engine.units import parse_bytes

    return StoreConfig(device_budget_bytes=parse_bytes(args.device_budget, arg="--device-budget"),
                       host_budget_bytes=parse_bytes(args.host_budget, arg="--host-budget"))


def _gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stream", action="append", help="stream(s) to read (default: all)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)


def add_engine_commands(sub: "argparse._SubParsersAction") -> None:
    """Register the engine's subcommands on the root parser's subparsers."""
    p = sub.add_parser("ingest", help="ingest documents into a KV-block store (resumable)")
    p.add_argument("--model", required=True, help="exported model dir, or random:PRESET")
    p.add_argument("--store", required=True, help="store path (created if missing)")
    p.add_argument("--stream", help="stream name (default: the file's name)")
    p.add_argument("files", nargs="+", help="text files")
    p.add_argument("--flush-interval", type=float, default=5.0,
                   help="seconds between durable commits (a crash loses at most about this much; default 5)")
    p.add_argument("--no-progress", action="store_true")
    _retrieval_args(p)
    p.set_defaults(func=_cmd_ingest)

    for name, helptext in (("ask", "answer a question from the store"),
                           ("generate", "continue a prompt with retrieval from the store")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True)
        p.add_argument("--store", required=True)
        p.add_argument("prompt", help="question or prompt text")
        _gen_args(p)
        _retrieval_args(p)
        p.set_defaults(func=_cmd_generate, mode=name)

    ev = sub.add_parser("eval", help="evaluations")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    p = ev_sub.add_parser("passkey", help="passkey retrieval accuracy per length and depth")
    p.add_argument("--model", required=True)
    p.add_argument("--lengths", default="512,2k,8k", help="comma list, e.g. 512,4k,32k,1M")
    p.add_argument("--depths", default="0,0.5,1", help="comma list in [0, 1]")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--full-max-len", default="8k", help="full-attention baseline up to this length")
    p.add_argument("--out", default="runs/passkey", help="directory for passkey.json and passkey.png")
    _retrieval_args(p)
    p.set_defaults(func=_cmd_passkey)

    store = sub.add_parser("store", help="inspect a KV-block store")
    store_sub = store.add_subparsers(dest="store_command", required=True)
    insp = store_sub.add_parser("inspect", help="print layout, block counts, size on disk, stats")
    insp.add_argument("path")
    insp.set_defaults(func=_store_inspect)


def _cmd_ingest(args: argparse.Namespace) -> int:
    from engine.inference import TOKENIZER, ingest, open_store

    model = load_model_arg(args.model)
    rc = _retrieval_config(args)
    store = open_store(args.store, model.cfg, "a", config=_store_config(args))
    try:
        for f in args.files:
            path = Path(f)
            if not path.is_file():
                raise FileNotFoundError(f"{f}: no such file")
            text = path.read_text(encoding="utf-8", errors="replace")
            if not text:
                raise ValueError(f"{f}: file holds no text")
            stream = args.stream or path.name
            r = ingest(model, store, stream, TOKENIZER.encode(text), source=str(path.resolve()),
                       retrieval=rc, flush_interval_s=args.flush_interval, progress=not args.no_progress)
            print(f"{f} -> stream {stream!r}: {r.tokens:,} tokens ingested"
                  + (f" ({r.skipped:,} already there)" if r.skipped else "")
                  + f", {r.blocks_put} blocks, {r.tokens_per_s:,.0f} tok/s, "
                  f"{r.bytes_fetched / 2**20:.1f} MiB fetched")
    finally:
        store.close()
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from engine.inference import GenerateConfig, TOKENIZER, generate, open_store

    model = load_model_arg(args.model)
    store = open_store(args.store, model.cfg, "r", config=_store_config(args))
    try:
        streams = args.stream
        if streams:
            unknown = [s for s in streams if s not in store.streams()]
            if unknown:
                raise ValueError(f"--stream {unknown}: not in the store; it has {store.streams()}")
        gc = GenerateConfig(max_new_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, stop=tuple(args.stop), seed=args.seed)
        out = sys.stdout

        def emit(piece: str) -> None:
            out.write(piece)
            out.flush()

        for _ in generate(model, store, TOKENIZER.encode(args.prompt), streams=streams,
                          retrieval=_retrieval_config(args), gen=gc, on_text=emit):
            pass
        out.write("\n")
    finally:
        store.close()
    return 0


def _cmd_passkey(args: argparse.Namespace) -> int:
    from engine.passkey import PasskeyConfig, format_table, run_passkey, write_outputs
    from engine.units import parse_context

    model = load_model_arg(args.model)
    pc = PasskeyConfig(lengths=[parse_context(x, arg="--lengths") for x in args.lengths.split(",")],
                       depths=[float(x) for x in args.depths.split(",")], trials=args.trials,
                       full_max_len=parse_context(args.full_max_len, arg="--full-max-len"),
                       retrieval=_retrieval_config(args))
    result = run_passkey(model, pc)
    print(format_table(result))
    for p in write_outputs(result, args.out):
        print(f"wrote {p}")
    return 0


def _store_inspect(args: argparse.Namespace) -> int:
    from memory_store.inspect import inspect_store

    print(inspect_store(args.path))
    return 0
