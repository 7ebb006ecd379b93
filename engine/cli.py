"""Engine subcommands of the `folio` CLI: import, ingest, ask, generate, eval passkey, store inspect.

The root parser lives in `train/cli.py` (train sits on top of the import order), which
calls `add_engine_commands` to register these. Each command parses, builds a config,
and calls one function.

--model takes a Folio model directory (`folio import` / `folio export`: model.safetensors +
config.json, with tokenizer.json for a pretrained model), a Hugging Face checkpoint
directory or a .gguf file (imported in memory), or `random:PRESET[:SEED]`, a randomly
initialised model (for testing the plumbing before a model is trained).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.eval_cli import add_eval_commands


def load_model_arg(spec: str):
    """(model, tokenizer) from --model: a Folio model directory, a Hugging Face checkpoint
    directory or a .gguf file (imported in memory: `folio import` saves the conversion), or
    random:PRESET[:SEED]."""
    import torch

    from engine.checkpoint import load_model
    from engine.config import preset
    from engine.convert import import_checkpoint, is_hf_directory
    from engine.errors import CheckpointNotFoundError
    from engine.model import LandmarkTransformer
    from engine.tokenizer import ByteTokenizer, load_tokenizer

    if spec.startswith("random:"):
        parts = spec.split(":")
        seed = int(parts[2]) if len(parts) > 2 else 0
        torch.manual_seed(seed)
        return LandmarkTransformer(preset(parts[1])).eval(), ByteTokenizer()
    path = Path(spec)
    if (path.is_file() and path.suffix == ".gguf") or (path.is_dir() and is_hf_directory(path)):
        return import_checkpoint(path)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"--model {spec!r}: no such directory or .gguf file (expected a Folio model "
                                      f"from `folio import`/`folio export`, a Hugging Face checkpoint directory, "
                                      f"a .gguf file, or random:PRESET)")
    model = load_model(spec)
    return model, load_tokenizer(spec, model_vocab=model.cfg.vocab_size - 1)


TRAINING_FREE_FLAGS = ("sink_blocks", "block_key", "query_agg", "search_distance", "decode_reselect")


def add_training_free_args(g, *, common: bool) -> None:
    """The flags of training-free retrieval (models without landmarks) on a parser or group;
    common: also --top-k, --local-blocks and --chunk (which landmark retrieval shares)."""
    if common:
        g.add_argument("--top-k", type=int, default=None,
                       help="blocks retrieved per layer and KV head (default 4 with landmarks, 8 without)")
        g.add_argument("--local-blocks", type=int, default=None,
                       help="complete blocks kept in the local window (default 2 with landmarks, 16 without)")
        g.add_argument("--chunk", type=int, default=None,
                       help="prefill chunk in positions (default: landmark models, the window minus the local "
                            "blocks; otherwise 512)")
    g.add_argument("--sink-blocks", type=int, default=None,
                   help="models without landmarks: the stream's first blocks, always attended (default 1)")
    g.add_argument("--block-key", choices=("mean", "max-norm"), default=None,
                   help="models without landmarks: a block's index key from its keys (default mean)")
    g.add_argument("--query-agg", choices=("mean", "max"), default=None,
                   help="models without landmarks: a chunk's queries score a block by their mean (default) or max")
    g.add_argument("--search-distance", type=int, default=None,
                   help="models without landmarks: rotate search queries by this distance (default: where the "
                        "retrieved blocks sit, (local_blocks + top_k/2) * block_len; 0 = unrotated)")
    g.add_argument("--decode-reselect", type=int, default=None,
                   help="models without landmarks: decode steps between block selections (default 16)")


def training_free_config(args):
    """TrainingFreeConfig from the flags `add_training_free_args` adds (None: the default)."""
    from engine.training_free import TrainingFreeConfig

    given = {k: getattr(args, k) for k in ("top_k", "local_blocks") + TRAINING_FREE_FLAGS
             if getattr(args, k, None) is not None}
    if getattr(args, "chunk", None) is not None:
        given["chunk_len"] = args.chunk
    return TrainingFreeConfig(**given)


def _retrieval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("retrieval (defaults depend on the model: landmark-trained, or a pretrained model "
                             "without landmarks, which uses training-free retrieval)")
    add_training_free_args(g, common=True)
    g.add_argument("--positions", choices=("stingy", "true"), default="stingy",
                   help="landmark models: positions of retrieved blocks (default stingy: a short prefix)")
    g.add_argument("--selection", choices=("chunk", "token"), default="chunk",
                   help="landmark models: one choice per chunk (max over its queries) or per token")
    g.add_argument("--device-budget", default="512MiB", help="device tier budget (e.g. 512MiB)")
    g.add_argument("--host-budget", default="2GiB", help="host tier budget (e.g. 2GiB)")


def _retrieval_config(args, cfg):
    """RetrievalConfig (landmark model) or TrainingFreeConfig (causal model) from the flags."""
    from engine.retrieval import RetrievalConfig

    def flags_set(*names: str) -> str:  # the retrieval flags set on the command line, as written
        return ", ".join(f"--{k.replace('_', '-')}" for k in names + TRAINING_FREE_FLAGS
                         if getattr(args, k, None) is not None)

    if cfg.uio is not None:
        if bad := flags_set("top_k", "local_blocks", "chunk"):
            raise ValueError(f"{bad}: this model reads UIO memories "
                             f"(ModelConfig.uio): every window's memory is attended, nothing is retrieved; these "
                             f"flags do not apply")
        return None
    if cfg.folded_window:
        from engine.folded import FoldedConfig

        if bad := flags_set("top_k", "local_blocks"):
            raise ValueError(f"{bad}: this model uses folded context (folded_window="
                             f"{cfg.folded_window}): it attends to the previous window of every layer and "
                             f"retrieves nothing; only --chunk applies")
        rc = FoldedConfig(chunk_len=args.chunk)
        rc.chunk_for(cfg)  # a chunk that is not a multiple of the window fails here, before any work
        return rc
    if cfg.landmarks:
        if any(getattr(args, k, None) is not None for k in TRAINING_FREE_FLAGS):
            raise ValueError("--sink-blocks/--block-key/--query-agg/--search-distance/--decode-reselect are for "
                             "models without landmarks; this one is landmark-trained")
        given = {k: v for k, v in (("top_k", args.top_k), ("local_blocks", args.local_blocks)) if v is not None}
        return RetrievalConfig(**given, positions=args.positions, selection=args.selection, chunk_len=args.chunk)
    return training_free_config(args)


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
    p = sub.add_parser("import", help="import a Hugging Face Llama-family checkpoint or a GGUF file",
                       description="Convert a pretrained checkpoint (a Hugging Face directory: config.json, "
                                   "safetensors, tokenizer.json; or a .gguf file) into a Folio model directory. "
                                   "Llama 2/3.x (rope_scaling llama3/linear), SmolLM2, TinyLlama, Mistral and Qwen2 "
                                   "without sliding windows.")
    p.add_argument("src", help="Hugging Face checkpoint directory or .gguf file")
    p.add_argument("--out", required=True, help="Folio model directory to write")
    p.add_argument("--block-len", type=int, default=64, help="positions per store block (default 64)")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("ingest", help="ingest documents into a KV-block store (resumable)")
    p.add_argument("--model", required=True,
                   help="Folio model dir, Hugging Face checkpoint dir, .gguf file, or random:PRESET")
    p.add_argument("--store", required=True, help="store path (created if missing)")
    p.add_argument("--raw", action="store_true",
                   help="chat models: ingest the text as it is (default: as the start of a user turn, "
                        "which a later `folio ask` closes with the question)")
    p.add_argument("--stream", help="stream name (default: the file's name)")
    p.add_argument("files", nargs="+", help="text files")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="when another process is writing to the store, wait up to this long for it "
                        "(default 0: refuse at once, naming the writer)")
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
        if name == "ask":
            p.add_argument("--raw", action="store_true",
                           help="send the question as it is (default: in the model's chat template)")
        _gen_args(p)
        _retrieval_args(p)
        p.set_defaults(func=_cmd_generate, mode=name)

    ev = sub.add_parser("eval", help="evaluations")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    add_eval_commands(ev_sub)
    p = ev_sub.add_parser("passkey", help="passkey retrieval accuracy per length and depth")
    p.add_argument("--model", required=True)
    p.add_argument("--lengths", default="512,2k,8k", help="comma list, e.g. 512,4k,32k,1M")
    p.add_argument("--depths", default="0,0.5,1", help="comma list in [0, 1]")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--full-max-len", default="8k", help="full-attention baseline up to this length")
    p.add_argument("--out", default="runs/passkey", help="directory for passkey.json and passkey.png")
    p.add_argument("--filler", default="generator",
                   help="'generator' (the paper's repeated sentences) or a document whose prose is the haystack, "
                        "e.g. austen:persuasion (held out from training)")
    _retrieval_args(p)
    p.set_defaults(func=_cmd_passkey)

    store = sub.add_parser("store", help="inspect a KV-block store")
    store_sub = store.add_subparsers(dest="store_command", required=True)
    insp = store_sub.add_parser("inspect", help="print layout, block counts, size on disk, stats")
    insp.add_argument("path")
    insp.set_defaults(func=_store_inspect)


def _cmd_import(args: argparse.Namespace) -> int:
    import time

    from engine.convert import import_checkpoint, save_imported

    t0 = time.perf_counter()
    model, tok = import_checkpoint(args.src, block_len=args.block_len)
    out = save_imported(model, tok, args.out)
    c = model.cfg
    print(f"imported {args.src} -> {out} in {time.perf_counter() - t0:.1f} s: {model.num_params() / 1e6:.1f}M "
          f"parameters, {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads / {c.n_kv_heads} KV heads, "
          f"vocab {c.vocab_size - 1} + landmark {tok.landmark_id}, context {c.max_seq_len}, "
          f"chat template {'yes' if tok.chat_parts() else 'no'}")
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from engine.inference import CHAT_META, chat_document, ingest, open_store

    model, tok = load_model_arg(args.model)
    rc = _retrieval_config(args, model.cfg)
    chat = not args.raw and tok.chat_parts() is not None
    store = open_store(args.store, model.cfg, "a", config=_store_config(args), wait_s=args.wait)
    try:
        for f in args.files:
            path = Path(f)
            if not path.is_file():
                raise FileNotFoundError(f"{f}: no such file")
            text = path.read_text(encoding="utf-8", errors="replace")
            if not text:
                raise ValueError(f"{f}: file holds no text")
            stream = args.stream or path.name
            ids = chat_document(tok, text) if chat else tok.encode(text)
            r = ingest(model, store, stream, ids, source=str(path.resolve()), retrieval=rc,
                       flush_interval_s=args.flush_interval, progress=not args.no_progress, tokenizer=tok,
                       meta_update={CHAT_META: chat})
            print(f"{f} -> stream {stream!r}: {r.tokens:,} tokens ingested"
                  + (f" ({r.skipped:,} already there)" if r.skipped else "")
                  + f", {r.blocks_put} blocks, {r.tokens_per_s:,.0f} tok/s, "
                  f"{r.bytes_fetched / 2**20:.1f} MiB fetched")
    finally:
        store.close()
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from engine.inference import GenerateConfig, continues_chat_turn, generate, open_store, question_tokens

    model, tok = load_model_arg(args.model)
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

        if args.mode == "ask":
            prompt = question_tokens(tok, args.prompt, chat=not args.raw,
                                     continues_turn=continues_chat_turn(store, streams))
        else:
            prompt = tok.encode(args.prompt)
        for _ in generate(model, store, prompt, streams=streams, retrieval=_retrieval_config(args, model.cfg),
                          gen=gc, on_text=emit, tokenizer=tok):
            pass
        out.write("\n")
    finally:
        store.close()
    return 0


def _cmd_passkey(args: argparse.Namespace) -> int:
    from engine.passkey import PasskeyConfig, format_table, run_passkey, write_outputs
    from engine.units import parse_context

    model, _ = load_model_arg(args.model)
    c = model.cfg
    if not (c.landmarks or c.folded_window or c.uio is not None):
        raise ValueError("folio eval passkey runs Folio's byte-level models with a memory (landmark, folded "
                         "context or UIO); for a pretrained checkpoint use `folio eval needle`")
    from engine.retrieval import RetrievalConfig

    rc = _retrieval_config(args, c)  # refuses retrieval flags for a model with its own memory
    pc = PasskeyConfig(lengths=[parse_context(x, arg="--lengths") for x in args.lengths.split(",")],
                       depths=[float(x) for x in args.depths.split(",")], trials=args.trials,
                       full_max_len=parse_context(args.full_max_len, arg="--full-max-len"),
                       retrieval=rc if isinstance(rc, RetrievalConfig) else RetrievalConfig(), filler=args.filler)
    result = run_passkey(model, pc)
    print(format_table(result))
    for p in write_outputs(result, args.out):
        print(f"wrote {p}")
    return 0


def _store_inspect(args: argparse.Namespace) -> int:
    from memory_store.inspect import inspect_store

    print(inspect_store(args.path))
    return 0
