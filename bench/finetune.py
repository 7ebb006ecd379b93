"""The landmark fine-tune against its base model, on the same held-out trials in one run.

    python -m bench.finetune [--quick] [--out DIR] [--tuned models/smollm2-135m-landmark-decode] [--base models/smollm2-135m]
                             [--lengths 4096,8192,32768] [--trials 2] [--ppl-contexts 8192,32768,131072]

Needle: keys hidden in the held-out novel (Persuasion), the evaluation's own needle
sentences, key formats and question wording (engine/needle.py; the fine-tune trained on
other phrasings, labels and vocabularies: train/prose_tasks.py), asked in the chat format.
The same trials (one seed, one tokenizer) go to
- the fine-tuned model with its landmark retrieval (`tuned retrieval`) and its local window
  alone (`tuned local`),
- the base model with training-free retrieval (`base retrieval`), its own full attention up
  to its 8k window (`base full`), and its local window alone (`base local`).
Perplexity: the last M tokens of held-out text, the fine-tuned model with retrieval at each
context against the base model's full attention over its 8k window (--base-context), same tokens.

Writes runs/bench/finetune.json (every trial and answer), finetune.md (the tables) and
finetune.png (--out DIR to choose); ratios are against the baselines of this run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench import RUNS

RESULTS = RUNS
DEFAULT_TUNED = Path("models/smollm2-135m-landmark-decode")
DEFAULT_BASE = Path("models/smollm2-135m")


def _ints(s: str) -> list[int]:
    from engine.units import parse_context

    return [parse_context(x.strip(), arg="lengths") for x in s.split(",") if x.strip()]


def needle_cells(results: dict[str, dict]) -> list[dict]:
    """One row per (system, length): accuracy over its trials, and per depth."""
    rows = []
    for label, res in results.items():
        for rec_mode in sorted({t["mode"] for t in res["trials"]}):
            for n in sorted({t["length"] for t in res["trials"]}):
                sel = [t for t in res["trials"] if t["mode"] == rec_mode and t["length"] == n]
                if not sel:
                    continue
                depths = sorted({t["depth"] for t in sel})
                rows.append({"system": f"{label} {rec_mode}", "length": n, "trials": len(sel),
                             "accuracy": round(sum(t["correct"] for t in sel) / len(sel), 3),
                             "by_depth": {f"{d:g}": round(sum(t["correct"] for t in sel if t["depth"] == d)
                                                          / sum(1 for t in sel if t["depth"] == d), 3) for d in depths},
                             "s_per_trial": round(sum(t["seconds"] for t in sel) / len(sel), 1)})
    return rows


def needle_table(rows: list[dict]) -> str:
    systems = list(dict.fromkeys(r["system"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    get = {(r["system"], r["length"]): r for r in rows}
    lines = ["| length | " + " | ".join(systems) + " |", "|---:|" + "---:|" * len(systems)]
    for n in lengths:
        cells = []
        for s in systems:
            r = get.get((s, n))
            cells.append("-" if r is None else f"{r['accuracy']:.2f} ({r['trials']})")
        lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    depths = sorted({d for r in rows for d in r["by_depth"]}, key=float)
    lines += ["", "| system | length | " + " | ".join(f"d={d}" for d in depths) + " |",
              "|---|---:|" + "---:|" * len(depths)]
    for r in rows:
        lines.append(f"| {r['system']} | {r['length']:,} | " + " | ".join(
            f"{r['by_depth'][d]:.2f}" if d in r["by_depth"] else "-" for d in depths) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8), constrained_layout=True)
    for s in dict.fromkeys(r["system"] for r in rows):
        pts = sorted((r["length"], r["accuracy"]) for r in rows if r["system"] == s)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle accuracy (held-out prose)")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.finetune", description=__doc__.splitlines()[0])
    ap.add_argument("--tuned", default=str(DEFAULT_TUNED), help="the fine-tuned model (adapter or model dir)")
    ap.add_argument("--base", default=str(DEFAULT_BASE), help="its base model")
    ap.add_argument("--lengths", default="4096,8192,32768", help="needle prompt lengths")
    ap.add_argument("--long-lengths", default="", help="longer lengths run for the fine-tuned retrieval and the "
                                                       "base retrieval only (--long-depths, --long-trials)")
    ap.add_argument("--long-depths", default="0.25,0.5,0.75")
    ap.add_argument("--long-trials", type=int, default=1)
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths")
    ap.add_argument("--formats", default="passkey,word,code")
    ap.add_argument("--trials", type=int, default=2, help="haystacks per length")
    ap.add_argument("--top-k", type=int, default=None, help="retrieved blocks for the fine-tuned model (default 4, "
                                                            "as trained); the base keeps training-free defaults")
    ap.add_argument("--sink-blocks", type=int, default=0, help="the fine-tuned model's attention sinks: its "
                    "stream's first blocks, attended beside the top-k (RetrievalConfig.sink_blocks; default 0)")
    ap.add_argument("--tuned-modes", default="retrieval,local", help="needle modes of the fine-tuned model")
    ap.add_argument("--base-modes", default="retrieval,full,local", help="needle modes of the base model "
                    "('' skips its needle run)")
    ap.add_argument("--ppl-contexts", default="8192,32768,131072",
                    help="perplexity contexts for the fine-tuned model's retrieval ('' skips perplexity)")
    ap.add_argument("--ppl-tokens", type=int, default=512, help="scored tokens M")
    ap.add_argument("--base-context", default="8192", help="the base model's full-attention context (its window)")
    ap.add_argument("--no-needle", action="store_true", help="perplexity only")
    ap.add_argument("--quick", action="store_true", help="4k only, 1 trial, 2 depths, 1 format, no perplexity")
    ap.add_argument("--out", default=str(RESULTS), help="directory for finetune.json/.md/.png")
    args = ap.parse_args(argv)

    import torch

    from engine.commands import load_model_arg
    from engine.needle import NeedleConfig, machine_info, run_needle
    from engine.perplexity import PerplexityConfig, paired_delta, run_perplexity
    from engine.retrieval import RetrievalConfig
    from engine.training_free import TrainingFreeConfig

    if args.quick:
        args.lengths, args.depths, args.formats, args.trials, args.ppl_contexts = "4096", "0.25,0.75", "code", 1, ""
    lengths = _ints(args.lengths)
    depths = [float(d) for d in args.depths.split(",")]
    formats = tuple(f.strip() for f in args.formats.split(","))
    t0 = time.perf_counter()
    base, btok = load_model_arg(args.base)
    tuned, ttok = load_model_arg(args.tuned)
    if not tuned.cfg.landmarks:
        raise SystemExit(f"--tuned {args.tuned!r} is not landmark-trained")
    if ttok.encode("Mr. Elliot was") != btok.encode("Mr. Elliot was"):
        raise SystemExit("the two models' tokenizers differ: the trials would not be the same")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"command": "python -m bench.finetune " + " ".join(sys.argv[1:] if argv is None else argv),
                    "machine": machine_info(), "tuned": args.tuned, "base": args.base, "needle": {}, "perplexity": {}}

    def save() -> None:
        result["needle_rows"] = needle_cells(result["needle"])
        result["seconds"] = round(time.perf_counter() - t0, 1)
        (out / "finetune.json").write_text(json.dumps(result, indent=1) + "\n")

    tuned_rc = TrainingFreeConfig(top_k=args.top_k if args.top_k is not None else 4)
    tuned_lm = RetrievalConfig(top_k=tuned_rc.top_k, sink_blocks=args.sink_blocks)  # its landmark retrieval
    grid = dict(lengths=lengths, depths=depths, trials=args.trials, formats=formats, seed=0)
    modes = lambda s: tuple(m.strip() for m in s.split(",") if m.strip())  # noqa: E731
    # an empty --tuned-modes / --base-modes skips that model's needle run (e.g. a base measured before)
    runs = [(label, model, tok, NeedleConfig(**grid, modes=modes(m), **extra))
            for label, model, tok, m, extra in (("tuned", tuned, ttok, args.tuned_modes,
                                                 {"retrieval": tuned_rc, "landmark": tuned_lm}),
                                                ("base", base, btok, args.base_modes, {}))
            if modes(m)]
    long = _ints(args.long_lengths) if args.long_lengths else []
    if args.no_needle:
        runs = []
        prev = out / "finetune.json"
        if prev.is_file():  # keep the needle results of an earlier run in the same files
            result["needle"] = json.loads(prev.read_text()).get("needle", {})
    for label, model, tok, cfg in runs:
        with torch.no_grad():
            res = run_needle(model, tok, cfg)
        result["needle"][label] = res
        if long:
            lcfg = NeedleConfig(lengths=long, depths=[float(d) for d in args.long_depths.split(",")],
                                trials=args.long_trials, formats=formats, seed=1, modes=("retrieval",),
                                retrieval=cfg.retrieval, landmark=cfg.landmark)
            with torch.no_grad():
                more = run_needle(model, tok, lcfg)
            res["trials"] += more["trials"]
        save()
        print(needle_table(needle_cells(result["needle"])), flush=True)
    if args.ppl_contexts:
        ctx = _ints(args.ppl_contexts)
        bc = _ints(args.base_context)[0]
        common = dict(contexts=sorted(set(ctx) | {bc}), scored_tokens=args.ppl_tokens, full_max_len=bc)
        with torch.no_grad():
            pb = run_perplexity(base, btok, PerplexityConfig(**common, modes=("full",)))
            pt = run_perplexity(tuned, ttok, PerplexityConfig(**common, modes=("retrieval",),
                                                              retrieval=tuned_rc, landmark=tuned_lm))
        same = ("scored_text_start", "scored_text_end")
        assert all(pb["document"][k] == pt["document"][k] for k in same), "the scored tokens differ"
        # the same M scored tokens (the documents end alike; the longer context reaches further back)
        assert pb["rows"][0]["tokens"] == pt["rows"][0]["tokens"]
        ref = next(r for r in pb["rows"] if r["context"] == bc)
        result["perplexity"] = {"base_full": {k: ref[k] for k in ("nll", "ppl", "tokens", "context")},
                                "tuned_retrieval": [{k: r[k] for k in ("context", "nll", "ppl", "seconds")}
                                                    for r in pt["rows"]],
                                "document": pb["document"]}
        for r, row in zip(result["perplexity"]["tuned_retrieval"], pt["rows"]):
            r["ppl_vs_base_full"] = round(r["ppl"] / ref["ppl"], 4)
            # paired over the same tokens: mean per-token NLL difference and its standard error
            r["delta_nll_vs_base_full"], r["delta_nll_se"] = (round(x, 5) for x in paired_delta(row, ref))
    save()
    md = []
    if result["needle_rows"]:
        md += ["## Needle (held-out prose, evaluation phrasing; accuracy (trials))", "", needle_table(result["needle_rows"])]
    if result["perplexity"]:
        p = result["perplexity"]
        md += ["", f"## Perplexity of the last {args.ppl_tokens} tokens (held-out text)", "",
               "| system | context | perplexity | vs base full | Δnll/token vs base full (± s.e.) |",
               "|---|---:|---:|---:|---:|",
               f"| base full | {p['base_full']['context']:,} | {p['base_full']['ppl']:.3f} | 1.000 | - |"]
        md += [f"| tuned retrieval | {r['context']:,} | {r['ppl']:.3f} | {r['ppl_vs_base_full']:.3f} | "
               f"{r['delta_nll_vs_base_full']:+.3f} ± {r['delta_nll_se']:.3f} |" for r in p["tuned_retrieval"]]
    (out / "finetune.md").write_text("\n".join(md) + "\n")
    wrote = [out / "finetune.json", out / "finetune.md"]
    if result["needle_rows"]:  # --no-needle: nothing to plot
        wrote.append(plot(result["needle_rows"], out / "finetune.png"))
    print("\n".join(md))
    print(f"wrote {', '.join(map(str, wrote))} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
