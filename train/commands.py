"""What the training side's `folio` commands do: train, export, demo, perplexity. The parser is
train/cli.py's; each function takes its parsed arguments, builds a config, calls one function
and returns the exit code (130/143: a run stopped by SIGINT/SIGTERM, after its checkpoint)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

_SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}


def _parse_assignments(items: Sequence[str] | None, what: str) -> dict[str, Any]:
    """KEY=VALUE pairs; VALUE is read as JSON when it parses (numbers, lists, true), else a string."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} {item!r} is invalid: expected KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def train_config_from_args(args: argparse.Namespace):  # -> TrainConfig
    """The TrainConfig of `folio train`: preset, then --set, then the named options."""
    from train.config import train_preset

    fields: dict[str, Any] = _parse_assignments(args.assign, "--set")
    named = {"model": args.model, "data": tuple(args.data) if args.data else None,
             "data_weights": tuple(args.data_weights) if args.data_weights else None,
             "jsonl_field": args.jsonl_field, "max_steps": args.steps, "micro_batch": args.micro_batch,
             "grad_accum": args.grad_accum, "lr": args.lr, "window_len": args.window,
             "precision": args.precision, "seed": args.seed, "out_dir": args.out,
             "save_every": args.save_every, "init_from": args.init_from, "lora_rank": args.lora_rank,
             "lora_targets": tuple(t.strip() for t in args.lora_targets.split(",")) if args.lora_targets else None}
    if args.init_from and not args.model:
        from train.config import TRAIN_PRESETS

        named["model"] = "init"  # the model is the one fine-tuning starts from
        if TRAIN_PRESETS.get(args.preset, {}).get("model") != "init":
            fields.setdefault("model_overrides", {})  # a tiny preset's overrides are not this model's
    fields.update({k: v for k, v in named.items() if v is not None})
    if args.data and args.data_weights is None:
        fields.setdefault("data_weights", None)  # the preset's weights belong to its own sources
    if args.model or args.model_set:
        from train.config import TRAIN_PRESETS

        # a preset's model overrides belong to its own model preset
        base = {} if args.model else dict(fields.get("model_overrides",
                                                     TRAIN_PRESETS.get(args.preset, {}).get("model_overrides", {})))
        fields["model_overrides"] = {**base, **_parse_assignments(args.model_set, "--model-set")}
    return train_preset(args.preset, **fields)


def cmd_train(args: argparse.Namespace) -> int:
    from train.loop import DSOptions, train

    tcfg = train_config_from_args(args)
    ds = DSOptions(config=args.ds_config, zero_stage=args.zero_stage, offload=args.offload,
                   nvme_path=args.nvme_path, verbose=args.verbose)
    result = train(tcfg, ds=ds, resume=args.resume, stop_after=args.stop_after,
                   progress=not args.no_progress)
    if os.environ.get("RANK", "0") != "0":
        return _SIGNAL_EXIT.get(result.stopped_by or "", 0)
    last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    print(f"step {result.step}: loss {last}, {result.tokens_per_s:.0f} tokens/s; "
          f"checkpoint {result.checkpoint}")
    if result.eval_loss is not None:
        import math

        print(f"held-out ({tcfg.eval_data}, {tcfg.eval_windows} windows): loss {result.eval_loss:.4f}, "
              f"perplexity {math.exp(result.eval_loss):.2f}")
    if result.loss_png:
        print(f"metrics {tcfg.out_dir}/metrics.jsonl, loss curve {result.loss_png}")
    if result.stopped_by in _SIGNAL_EXIT:
        print(f"stopped by {result.stopped_by}; continue with: folio train ... --resume {tcfg.out_dir}")
        return _SIGNAL_EXIT[result.stopped_by]
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from engine.checkpoint import load_model
    from engine.convert import export_hf
    from engine.tokenizer import HFTokenizer, load_tokenizer
    from train.checkpoint import export_from_checkpoint, find_checkpoint, is_model_dir

    src = Path(args.checkpoint)
    given_model = is_model_dir(src)
    if args.format in ("folio", "adapter"):
        out = export_from_checkpoint(src if given_model else find_checkpoint(src), args.out,
                                     adapter_only=args.format == "adapter")
        print(f"exported {src} -> {out}" + (" (adapter)" if args.format == "adapter" else ""))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = src if given_model else export_from_checkpoint(find_checkpoint(src), tmp)
        model = load_model(model_dir)
        tok = load_tokenizer(src if given_model else model_dir, model_vocab=model.cfg.vocab_size - 1)
        if not isinstance(tok, HFTokenizer):
            raise ValueError(f"{src}: --format hf needs a model with its checkpoint's own tokenizer "
                             f"(tokenizer.json, as `folio import` writes); Folio's byte-level models have none")
        out = export_hf(model, tok, args.out)
    print(f"exported {src} -> {out} (Hugging Face format)")
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from train.demo import held_out_perplexity

    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model!r}: no such directory (an exported model)")
    held_out_perplexity(Path(args.model), data=args.data, windows=args.windows, top_k=args.top_k)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from engine.units import parse_context
    from train.demo import DEMO_LENGTHS, run_demo

    top = 0 if args.max_length in ("0", "") else parse_context(args.max_length, arg="--max-length")
    lengths = tuple(n for n in DEMO_LENGTHS if n <= top)
    if top and top not in lengths:
        lengths += (top,)
    run_demo(out_dir=args.out, steps=args.steps, lengths=lengths, trials=args.trials, real=not args.no_real)
    return 0
