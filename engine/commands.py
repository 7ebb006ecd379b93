"""What the engine's `folio` commands do: import, ingest, ask/generate, eval (passkey, needle,
perplexity), store inspect, data. The parser is train/cli.py's; each function here takes its
parsed arguments, builds a config, calls one function of the engine, prints, and returns the
exit code.

--model takes a Folio model directory (`folio import` / `folio export`: model.safetensors +
config.json, with tokenizer.json for a pretrained model), a Hugging Face checkpoint
directory or a .gguf file (imported in memory), or `random:PRESET[:SEED]`, a randomly
initialised model (for testing the plumbing before a model is trained).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.needle import NeedleConfig
    from engine.perplexity import PerplexityConfig

TRAINING_FREE_FLAGS = ("sink_blocks", "block_key", "query_agg", "search_distance", "decode_reselect",
                       "question_selection")
"""The flags of training-free retrieval alone (train/cli.py adds them; landmark models refuse them)."""


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


def training_free_config(args):
    """TrainingFreeConfig from the training-free retrieval flags (train/cli.py; None: the default)."""
    from engine.training_free import TrainingFreeConfig

    given = {k: getattr(args, k) for k in ("top_k", "local_blocks") + TRAINING_FREE_FLAGS
             if getattr(args, k, None) is not None}
    if getattr(args, "chunk", None) is not None:
        given["chunk_len"] = args.chunk
    return TrainingFreeConfig(**given)


def retrieval_config(args, cfg):
    """RetrievalConfig (landmark model) or TrainingFreeConfig (causal model) from the flags."""
    from engine.retrieval import RetrievalConfig

    def flags_set(*names: str) -> str:  # the retrieval flags set on the command line, as written
        return ", ".join(f"--{k.replace('_', '-')}" for k in names + TRAINING_FREE_FLAGS
                         if getattr(args, k, None) is not None)

    if cfg.uio is not None and not cfg.landmarks:
        if bad := flags_set("top_k", "local_blocks", "chunk"):
            raise ValueError(f"{bad}: this model reads UIO memories "
                             f"(ModelConfig.uio) and has no landmarks: every window's memory is attended, nothing "
                             f"is retrieved; these flags do not apply")
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
        if any(getattr(args, k, None) is not None for k in TRAINING_FREE_FLAGS if k not in ("sink_blocks", "decode_reselect")):
            raise ValueError("--block-key/--query-agg/--search-distance/--question-selection are for "
                             "models without landmarks; this one is landmark-trained")
        return landmark_config(args)
    return training_free_config(args)


def landmark_config(args):
    """RetrievalConfig (a landmark-trained model's retrieval) from the flags; None: its default."""
    from engine.retrieval import RetrievalConfig

    given = {k: getattr(args, k) for k in ("top_k", "local_blocks", "sink_blocks", "positions", "selection",
                                           "decode_reselect")
             if getattr(args, k, None) is not None}
    return RetrievalConfig(**given, chunk_len=getattr(args, "chunk", None))


def store_where(args, where: str, mode: str):
    """The store to open: `where` itself (a path, or an s3:// URL whose filesystem reads its options from
    the environment), or with --storage-options a zarr FsspecStore of the URL with those options."""
    raw = getattr(args, "storage_options", None)
    if raw is None:
        return where
    import json

    from memory_store.object_store import is_url, open_url

    if not is_url(where):
        raise ValueError(f"--storage-options applies to an object-store URL (s3://bucket/path), not {where!r}")
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"--storage-options {raw!r}: not JSON ({e}); expected an object such as "
                         f'{{"endpoint_url": "http://127.0.0.1:9000"}}') from e
    if not isinstance(options, dict):
        raise ValueError(f"--storage-options {raw!r}: expected a JSON object of the filesystem's options")
    return open_url(where, storage_options=options, read_only=mode == "r")


def store_config(args):
    from memory_store import StoreConfig

    from engine.units import parse_bytes

    return StoreConfig(device_budget_bytes=parse_bytes(args.device_budget, arg="--device-budget"),
                       host_budget_bytes=parse_bytes(args.host_budget, arg="--host-budget"))


def cmd_import(args: argparse.Namespace) -> int:
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


def read_document(f: str) -> str:
    """The text of document `f` for `folio ingest`. ValueError (FileNotFoundError when missing) saying
    what is wrong: not a file, empty, binary (a NUL byte), or not UTF-8 (the offset of the first bad
    byte); a document is never ingested with guessed characters."""
    path = Path(f)
    if not path.exists():
        raise FileNotFoundError(f"{f}: no such file")
    if not path.is_file():
        raise ValueError(f"{f}: not a regular file (ingest takes text files)")
    data = path.read_bytes()
    if not data:
        raise ValueError(f"{f}: file holds no text (it is empty)")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ValueError(f"{f}: a binary file (NUL byte at offset {nul}); ingest takes UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{f}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}: {e.reason}); "
                         f"convert it first, e.g. `iconv -f latin1 -t utf-8 {f}`") from None


def cmd_ingest(args: argparse.Namespace) -> int:
    from engine.inference import CHAT_META, chat_document, ingest, open_store

    texts = [(f, read_document(f)) for f in args.files]  # every document checked before the store is opened
    model, tok = load_model_arg(args.model)
    rc = retrieval_config(args, model.cfg)
    chat = not args.raw and tok.chat_parts() is not None
    store = open_store(store_where(args, args.store, "a"), model.cfg, "a", config=store_config(args),
                       wait_s=args.wait)
    try:
        for f, text in texts:
            path = Path(f)
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


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.inference import GenerateConfig, continues_chat_turn, generate, open_store, question_tokens

    model, tok = load_model_arg(args.model)
    store = open_store(store_where(args, args.store, "r"), model.cfg, "r", config=store_config(args))
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
        for _ in generate(model, store, prompt, streams=streams, retrieval=retrieval_config(args, model.cfg),
                          gen=gc, on_text=emit, tokenizer=tok):
            pass
        out.write("\n")
    finally:
        store.close()
    return 0


def cmd_passkey(args: argparse.Namespace) -> int:
    from engine.passkey import PasskeyConfig, format_table, run_passkey, write_outputs
    from engine.units import parse_context

    model, _ = load_model_arg(args.model)
    c = model.cfg
    if not (c.landmarks or c.folded_window or c.uio is not None):
        raise ValueError("folio eval passkey runs Folio's byte-level models with a memory (landmark, folded "
                         "context or UIO); for a pretrained checkpoint use `folio eval needle`")
    from engine.retrieval import RetrievalConfig

    rc = retrieval_config(args, c)  # refuses retrieval flags for a model with its own memory
    pc = PasskeyConfig(lengths=[parse_context(x, arg="--lengths") for x in args.lengths.split(",")],
                       depths=[float(x) for x in args.depths.split(",")], trials=args.trials,
                       full_max_len=parse_context(args.full_max_len, arg="--full-max-len"),
                       retrieval=rc if isinstance(rc, RetrievalConfig) else RetrievalConfig(), filler=args.filler)
    result = run_passkey(model, pc)
    print(format_table(result))
    for p in write_outputs(result, args.out):
        print(f"wrote {p}")
    return 0


def cmd_store_inspect(args: argparse.Namespace) -> int:
    from memory_store.inspect import inspect_store

    print(inspect_store(store_where(args, args.path, "r")))
    return 0


# evaluations of a pretrained causal model (`folio eval needle | perplexity`)

def _list(text: str, parse, arg: str) -> list:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"{arg}={text!r} is empty: give a comma list")
    return [parse(x) for x in items]


def _contexts(text: str, arg: str) -> list[int]:
    from engine.units import parse_context

    return _list(text, lambda x: parse_context(x, arg=arg), arg)


def _run(args: argparse.Namespace, cfg, run, write_partial, format_table, write_outputs,
         landmarks_ok: bool = False) -> int:
    """One evaluation command: load the model, run with the partial result written after every
    group (write_partial), print the table, write the outputs."""
    model, tok = _load(args.model, landmarks_ok)
    command = ["folio", *sys.argv[1:]]
    result = run(model, tok, cfg, progress=not args.no_progress,
                 on_update=lambda r: write_partial({**r, "command": command, "complete": False}, args.out))
    result = {**result, "command": command, "complete": True}
    print(format_table(result))
    for path in write_outputs(result, args.out):
        print(f"wrote {path}")
    return 0


def _load(spec: str, landmarks_ok: bool = False):
    model, tok = load_model_arg(spec)
    if model.cfg.landmarks and not landmarks_ok:
        raise ValueError(f"--model {spec!r} is landmark-trained; these evaluations are for pretrained causal "
                         f"models (use `folio eval passkey`)")
    return model, tok


def needle_config(args: argparse.Namespace) -> "NeedleConfig":
    """The NeedleConfig of `folio eval needle`'s flags; ValueError names a bad flag."""
    from engine.needle import NeedleConfig
    from engine.units import parse_context

    return NeedleConfig(lengths=_contexts(args.lengths, "--lengths"),
                        depths=_list(args.depths, float, "--depths"), trials=args.trials,
                        formats=tuple(_list(args.formats, str, "--formats")),
                        modes=tuple(_list(args.modes, str, "--modes")),
                        full_max_len=parse_context(args.full_max_len, arg="--full-max-len"),
                        full_beyond=tuple(_contexts(args.full_beyond, "--full-beyond")) if args.full_beyond else (),
                        retrieval=training_free_config(args), landmark=landmark_config(args), seed=args.seed,
                        text=tuple(_list(args.text, str, "--text")), max_new_tokens=args.max_new_tokens)


def cmd_needle(args: argparse.Namespace) -> int:
    from engine.needle import format_table, run_needle, write_json, write_outputs

    return _run(args, needle_config(args), run_needle, write_json, format_table, write_outputs, landmarks_ok=True)


def perplexity_config(args: argparse.Namespace) -> "PerplexityConfig":
    """The PerplexityConfig of `folio eval perplexity`'s flags; ValueError names a bad flag."""
    from engine.perplexity import PerplexityConfig
    from engine.units import parse_context

    local_max = None if args.local_max_len.lower() == "none" else parse_context(args.local_max_len,
                                                                                 arg="--local-max-len")
    return PerplexityConfig(contexts=_contexts(args.contexts, "--contexts"),
                            modes=tuple(_list(args.modes, str, "--modes")), scored_tokens=args.scored,
                            full_max_len=parse_context(args.full_max_len, arg="--full-max-len"),
                            local_max_len=local_max, retrieval=training_free_config(args),
                            landmark=landmark_config(args),
                            texts=tuple(_list(args.text, str, "--text")) if args.text else None)


def cmd_eval_perplexity(args: argparse.Namespace) -> int:
    from engine.perplexity import format_table, run_perplexity, write_outputs

    return _run(args, perplexity_config(args), run_perplexity, write_outputs, format_table, write_outputs)


# `folio data`

def cmd_data_fetch(args: argparse.Namespace) -> int:
    from engine.corpora import fetch

    result = fetch(args.dir, progress=not args.quiet, force=args.force)
    if args.quiet:
        print(json.dumps(result, indent=1))
    # a missing tool is not an error of folio's, but the caller should know the corpus is absent
    return 0 if all(c["status"] != "unavailable" for c in result["corpora"].values()) else 1


def cmd_data_list(args: argparse.Namespace) -> int:
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


def cmd_data_show(args: argparse.Namespace) -> int:
    from engine.corpora import is_held_out, load

    if args.chars < 0:
        raise ValueError(f"--chars {args.chars} is invalid: a count >= 0 (0 = the whole document)")
    text = load(args.name, cache_dir=args.dir)
    split = "held out" if is_held_out(args.name) else "training"
    print(f"# {args.name}: {len(text):,} chars, {split}", file=sys.stderr)
    shown = text if args.chars == 0 else text[:args.chars]
    sys.stdout.write(shown if shown.endswith("\n") else shown + "\n")
    return 0
