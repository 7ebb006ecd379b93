"""`folio demo`: the main job on its built-in default.

1. Train the tiny preset briefly on passkey documents mixed with the stdlib corpus,
   through the default ds_config (ZeRO-2, optimizer offloaded to CPU; the first run
   builds DeepSpeed's cpu_adam op), and export it (`model.safetensors` + `config.json`).
2. Passkey evaluation from 1x to 2,000x the training window (512 positions -> 1M
   tokens): each document is ingested into a block store, the question is asked with
   landmark retrieval, beside the same model on its local window only (and full
   attention where it fits). The model evaluated is the shipped checkpoint
   `models/passkey-tiny` when present (a longer `folio train` run, see its README),
   else the one just trained.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from engine.allocator import JEMALLOC_DEFAULT_DECAY_MS, TRAINING_CONF, set_page_decay
from train.checkpoint import export_from_checkpoint
from train.config import train_preset
from train.loop import DSOptions, TrainResult, train


SHIPPED = Path(__file__).resolve().parent.parent / "models" / "passkey-tiny"
DEMO_LENGTHS = (512, 4096, 32768, 262144, 1048576)
ALL_DEPTHS_UP_TO = 32768  # beyond: the middle depth only (the 15-minute budget)


def run_demo(*, out_dir: str | os.PathLike = "runs/demo", steps: int | None = None,
             progress: bool = True, lengths: tuple[int, ...] = DEMO_LENGTHS,
             depths: tuple[float, ...] = (0.0, 0.5, 1.0), trials: int = 1) -> tuple[TrainResult, Path]:
    """Train tiny-demo into `out_dir` (from scratch), export it, run the passkey table.

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
    # training ran with jemalloc keeping freed pages (engine/allocator.py); the long ingests
    # below are inference: back to jemalloc's defaults, which keep their peak RSS lower
    if os.environ.get("MALLOC_CONF") == TRAINING_CONF:  # (set by folio's re-execution, not the user)
        set_page_decay(*JEMALLOC_DEFAULT_DECAY_MS)
    held_out_perplexity(export, windows=48)
    if lengths:
        evaluate_passkey(export, Path(tcfg.out_dir) / "passkey", lengths=lengths, depths=depths,
                         trials=trials)
    return result, export


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
