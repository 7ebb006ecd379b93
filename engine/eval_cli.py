"""`folio eval needle` and `folio eval perplexity`: evaluations of a pretrained causal model.

Registered on the `folio eval` subparsers by `engine.cli.add_engine_commands`. Each command
parses, builds a config, calls one run function, prints the table and writes its outputs
(partial results are written after every group, so a long run can be read while it goes).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.needle import NeedleConfig
    from engine.perplexity import PerplexityConfig


def _list(text: str, parse, arg: str) -> list:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"{arg}={text!r} is empty: give a comma list")
    return [parse(x) for x in items]


def _contexts(text: str, arg: str) -> list[int]:
    from engine.units import parse_context

    return _list(text, lambda x: parse_context(x, arg=arg), arg)


def _retrieval_args(p: argparse.ArgumentParser) -> None:
    from engine.cli import add_training_free_args

    add_training_free_args(p.add_argument_group("training-free retrieval (defaults: engine.training_free."
                                                "TrainingFreeConfig)"), common=True)


def _retrieval_config(args):
    from engine.cli import training_free_config

    return training_free_config(args)


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
    from engine.cli import load_model_arg

    model, tok = load_model_arg(spec)
    if model.cfg.landmarks and not landmarks_ok:
        raise ValueError(f"--model {spec!r} is landmark-trained; these evaluations are for pretrained causal "
                         f"models (use `folio eval passkey`)")
    return model, tok


def add_eval_commands(ev_sub: "argparse._SubParsersAction") -> None:
    """Register `needle` and `perplexity` on the `folio eval` subparsers."""
    p = ev_sub.add_parser("needle", help="needle-in-a-haystack accuracy of a pretrained model on real prose",
                          description="Hide a key (pass key, word or code) at each depth of a haystack cut from a "
                                      "real text and ask for it in the model's chat format: with retrieval, with "
                                      "the model's own full attention, and with the local window alone.")
    p.add_argument("--model", required=True, help="Folio model dir, Hugging Face checkpoint dir or .gguf file")
    p.add_argument("--lengths", default="4k,8k,32k", help="prompt lengths in tokens, e.g. 4k,8k,32k,128k")
    p.add_argument("--depths", default="0,0.5,1", help="needle depths in [0, 1]")
    p.add_argument("--trials", type=int, default=1, help="haystacks (random offsets and keys) per length")
    p.add_argument("--formats", default="passkey,word,code", help="key formats: passkey, word, code")
    p.add_argument("--modes", default="retrieval,full,local", help="modes: retrieval, full, local")
    p.add_argument("--full-max-len", default="8192", help="full attention up to this length (default 8192)")
    p.add_argument("--full-beyond", default="", help="longer lengths where full attention runs anyway, e.g. 12k")
    p.add_argument("--text", default="austen:persuasion",
                   help="document(s) the haystack is cut from (default: the held-out austen:persuasion)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--out", default="runs/needle", help="directory for needle.json, needle.md, needle.png")
    p.add_argument("--no-progress", action="store_true")
    _retrieval_args(p)
    p.set_defaults(func=_cmd_needle)

    p = ev_sub.add_parser("perplexity", help="perplexity of the same final tokens against context length",
                          description="Score the last --scored tokens of a long held-out document given C tokens "
                                      "before them: full attention (C up to --full-max-len), retrieval, local window.")
    p.add_argument("--model", required=True, help="Folio model dir, Hugging Face checkpoint dir or .gguf file")
    p.add_argument("--contexts", default="1024,2048,4096,8192,32768,131072", help="context lengths C, e.g. 1k,8k,32k")
    p.add_argument("--modes", default="full,retrieval,local", help="modes: full, retrieval, local")
    p.add_argument("--scored", type=int, default=512, help="scored tokens M (default 512)")
    p.add_argument("--full-max-len", default="8192", help="full attention up to this context (default 8192)")
    p.add_argument("--local-max-len", default="32768", help="local window up to this context ('none': every C)")
    p.add_argument("--text", default=None,
                   help="documents joined in order, the scored tokens at the end of the last (default: held-out "
                        "austen:persuasion, preceded by held-out SOTU addresses as needed)")
    p.add_argument("--out", default="runs/ppl", help="directory for perplexity.json, perplexity.md, perplexity.png")
    p.add_argument("--no-progress", action="store_true")
    _retrieval_args(p)
    p.set_defaults(func=_cmd_perplexity)


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
                        retrieval=_retrieval_config(args), seed=args.seed,
                        text=tuple(_list(args.text, str, "--text")), max_new_tokens=args.max_new_tokens)


def _cmd_needle(args: argparse.Namespace) -> int:
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
                            local_max_len=local_max, retrieval=_retrieval_config(args),
                            texts=tuple(_list(args.text, str, "--text")) if args.text else None)


def _cmd_perplexity(args: argparse.Namespace) -> int:
    from engine.perplexity import format_table, run_perplexity, write_outputs

    return _run(args, perplexity_config(args), run_perplexity, write_outputs, format_table, write_outputs)
