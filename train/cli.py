"""The `folio` command line: the root parser, the engine's commands, train/export/demo.

Thin by design: each command parses, builds a config, and calls one function. Errors a
user can fix (a bad config, a missing path, a checkpoint of another shape) print one
line and exit with code 2; a run stopped by SIGINT/SIGTERM exits 130/143 after its
checkpoint is written.

    folio train [--preset tiny-demo] [--data PATH ...] [--steps N] [--resume [PATH]] ...
    folio export RUN_OR_CHECKPOINT --out DIR
    folio demo
    torchrun --nproc_per_node 2 -m train.cli train ...
    deepspeed --num_gpus 2 --module train.cli train ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from train.errors import TrainError

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


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on long documents with DeepSpeed",
                       description="Train with DeepSpeed. Options left out come from the preset.")
    p.add_argument("--preset", default="tiny-demo", help="training preset (default tiny-demo)")
    p.add_argument("--model", help="model preset (tiny, small, ...)")
    p.add_argument("--model-set", action="append", metavar="KEY=VALUE",
                   help="override a ModelConfig field (repeatable), e.g. n_layers=1")
    p.add_argument("--data", action="append", metavar="SOURCE",
                   help="text file, folder, .jsonl, or passkey / recall / stdlib (repeatable)")
    p.add_argument("--data-weights", type=float, nargs="+", metavar="W", help="one weight per --data")
    p.add_argument("--jsonl-field", help="JSONL field holding the text (default text)")
    p.add_argument("--steps", type=int, help="optimizer steps (max_steps)")
    p.add_argument("--micro-batch", type=int, help="windows per forward per process")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--window", type=int, help="positions per training window (landmarks included)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="output directory (checkpoints, metrics.jsonl, loss.png)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (0: end and signals only)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", dest="assign",
                   help="set any TrainConfig field (repeatable)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="continue from the newest checkpoint of --out, or of PATH")
    p.add_argument("--init-from", metavar="DIR",
                   help="start from the weights of a model directory (`folio import` of a pretrained "
                        "checkpoint, or an export); without --model the run's model is that one "
                        "(with --model-set overrides, e.g. attention=landmark)")
    p.add_argument("--lora-rank", type=int, metavar="R",
                   help="train LoRA adapters of rank R (peft) on a frozen model; 0 = every weight")
    p.add_argument("--lora-targets", metavar="NAMES",
                   help="comma list of projections to adapt (default wq,wk,wv,wo; also w_gate,w_up,w_down)")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop (with a checkpoint) after step N of the schedule")
    p.add_argument("--ds-config", help="DeepSpeed config (default ./ds_config.json or the repository's)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="override the ZeRO stage")
    p.add_argument("--offload", help="'none', or a comma list of optimizer,param (param needs stage 3)")
    p.add_argument("--nvme-path", help="offload to NVMe files under this path instead of CPU memory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="DeepSpeed logs at INFO")
    # the deepspeed launcher appends --local_rank=N; the environment carries the same
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_train)


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


def _cmd_train(args: argparse.Namespace) -> int:
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


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a trained or imported model as a Folio or Hugging Face directory",
                       description="Export the newest complete checkpoint of a run (or the given step folder), "
                                   "or a Folio model directory. --format hf writes config.json + "
                                   "model.safetensors + tokenizer files that transformers loads (models with "
                                   "their checkpoint's own tokenizer: imported ones).")
    p.add_argument("checkpoint", help="a run's output directory, its checkpoints/ folder, a step folder, "
                                      "or a Folio model directory")
    p.add_argument("--out", required=True, help="directory to write into")
    p.add_argument("--format", choices=("folio", "hf", "adapter"), default="folio",
                   help="folio (model.safetensors + config.json + tokenizer files, default; a LoRA run's "
                        "adapters merged in), hf (Hugging Face) or adapter (a LoRA run's adapter alone, a "
                        "few MB, + tokenizer files; loads on top of its base model directory)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from engine.checkpoint import load_model
    from engine.convert import export_hf
    from engine.tokenizer import HFTokenizer, load_tokenizer
    from train.checkpoint import export_from_checkpoint, find_checkpoint

    src = Path(args.checkpoint)
    is_model_dir = ((src / "config.json").is_file() or (src / "adapter_config.json").is_file()) \
        and not (src / "folio_meta.json").is_file()
    if args.format in ("folio", "adapter"):
        out = export_from_checkpoint(src if is_model_dir else find_checkpoint(src), args.out,
                                     adapter_only=args.format == "adapter")
        print(f"exported {src} -> {out}" + (" (adapter)" if args.format == "adapter" else ""))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = src if is_model_dir else export_from_checkpoint(find_checkpoint(src), tmp)
        model = load_model(model_dir)
        tok = load_tokenizer(src if is_model_dir else model_dir, model_vocab=model.cfg.vocab_size - 1)
        if not isinstance(tok, HFTokenizer):
            raise ValueError(f"{src}: --format hf needs a model with its checkpoint's own tokenizer "
                             f"(tokenizer.json, as `folio import` writes); Folio's byte-level models have none")
        out = export_hf(model, tok, args.out)
    print(f"exported {src} -> {out} (Hugging Face format)")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train the tiny model briefly on the built-in data and export it")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the tiny-demo preset's)")
    p.add_argument("--max-length", default="1048576",
                   help="longest passkey document in tokens (default 1048576 = 2048x the "
                        "512-position window; 0 skips the evaluation)")
    p.add_argument("--trials", type=int, default=1, help="passkey trials per length and depth")
    p.add_argument("--no-real", action="store_true",
                   help="skip the real-model part (SmolLM2: ingest a real document, ask it, needle table)")
    p.set_defaults(func=_cmd_demo)


def _add_perplexity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("perplexity", help="held-out perplexity: local window only vs with retrieval")
    p.add_argument("--model", required=True, help="exported model directory")
    p.add_argument("--data", default="stdlib-heldout", help="source (default: held-out stdlib files)")
    p.add_argument("--windows", type=int, default=64, help="windows to run (default 64)")
    p.add_argument("--top-k", type=int, default=4)
    p.set_defaults(func=_cmd_perplexity)


def _cmd_perplexity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from train.demo import held_out_perplexity

    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model!r}: no such directory (an exported model)")
    held_out_perplexity(Path(args.model), data=args.data, windows=args.windows, top_k=args.top_k)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from engine.units import parse_context
    from train.demo import DEMO_LENGTHS, run_demo

    top = 0 if args.max_length in ("0", "") else parse_context(args.max_length, arg="--max-length")
    lengths = tuple(n for n in DEMO_LENGTHS if n <= top)
    if top and top not in lengths:
        lengths += (top,)
    run_demo(out_dir=args.out, steps=args.steps, lengths=lengths, trials=args.trials, real=not args.no_real)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The root `folio` parser with every subcommand registered."""
    from engine.cli import add_engine_commands
    from engine.corpora_cli import add_data_command
    from plan.cli import add_plan_command

    parser = argparse.ArgumentParser(prog="folio", description="Landmark-attention transformers over a "
                                     "tiered KV-block store, and their DeepSpeed trainer.")
    # the deepspeed launcher puts --local_rank=N before the command; LOCAL_RANK carries the same
    parser.add_argument("--local_rank", "--local-rank", type=int, dest="launcher_local_rank",
                        help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_engine_commands(sub)
    _add_train(sub)
    _add_export(sub)
    _add_demo(sub)
    _add_perplexity(sub)
    add_plan_command(sub)
    add_data_command(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from engine.errors import EngineError
    from memory_store.errors import StoreError

    return (TrainError, EngineError, StoreError, ValueError, FileNotFoundError)


def _command(args: Sequence[str]) -> str | None:
    """The subcommand of a `folio` command line (its arguments after the program), skipping
    options before it: the deepspeed launcher puts --local_rank=N (or --local_rank N) first."""
    i = 0
    while i < len(args) and args[i].startswith("-"):
        i += 2 if args[i] in ("--local_rank", "--local-rank") else 1
    return args[i] if i < len(args) else None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `folio` console script. Returns the exit code."""
    if argv is None:  # the console script itself (not a call from Python): jemalloc if the machine has it
        from engine.allocator import TRAINING_CONF, maybe_reexec

        try:
            maybe_reexec(sys.argv, conf=TRAINING_CONF if _command(sys.argv[1:]) in ("train", "demo") else None)
        except ValueError as e:
            print(f"folio: error: {e}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except _user_errors() as e:
        print(f"folio {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"folio {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
