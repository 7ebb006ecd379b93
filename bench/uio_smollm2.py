"""UIO-LLMs' own setting at this machine's scale: a frozen SmolLM2-135M-Instruct with the
encoder and transfer-head LoRAs, trained by `folio train` with incremental TBPTT.

    folio train --init-from models/smollm2-135m --model-set max_seq_len=256 \\
        --model-set 'uio={"ratio": 4, "S": 2, "factor": true, "train_base": false, "enc_rank": 8, "head_rank": 8, "max_windows": 4}' \\
        --window 256 --data austen --set retrieval=false --micro-batch 1 --steps 110 --lr 1e-3 --out runs/smol-uio
    folio export runs/smol-uio --out runs/smol-uio/export
    python -m bench.uio_smollm2 --model runs/smol-uio/export

On held-out Persuasion (never in training), documents of n windows of 256 tokens: the
perplexity of the LAST window with every earlier window's memory (64 slots per window and
layer), beside the same window alone — which is the base model exactly (no memory = the base,
tested U6), so the comparison is the memories' effect on the same tokens in the same run; beside
them the base model with full attention over the whole document (the upper bound: every earlier
token as context) and the memories as training starts them (LoRA B = 0, slot = EOS).
Writes runs/bench/uio_smollm2.json and .md beside it.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

from bench import RUNS, machine, write_results


@torch.no_grad()
def run(model_dir: str, *, base_dir: str | None = None, lengths=(2, 4, 8), docs: int = 12, log=print) -> dict:
    from engine.commands import load_model_arg
    from engine.corpora import held_out_documents, load
    from engine.uio import UIOMemory, encode

    m, tok = load_model_arg(model_dir)
    m.eval()
    fresh = None
    if base_dir:  # the base with UIO modules as training starts them (LoRA B = 0, slot = EOS)
        from engine.uio import UIOConfig, attach

        fresh, _ = load_model_arg(base_dir)
        fresh.eval()
        attach(fresh, UIOConfig(**m.cfg.uio), slot_token=tok.eos_id)
    T = m.cfg.max_seq_len
    ids = torch.tensor(tok.encode(load(held_out_documents("austen")[0])), dtype=torch.long)
    g = torch.Generator().manual_seed(5)
    out = {"model": model_dir, "window": T, "slots_per_window": m.uio.uio.slots(T), "documents": docs,
           "lengths": list(lengths), "perplexity": {}}
    for n in lengths:
        starts = torch.randint(0, ids.numel() - n * T - 1, (docs,), generator=g).tolist()
        nll = {"window only (= the base model)": 0.0, "with the memories": 0.0,
               "base, full attention over the whole document": 0.0}
        if fresh is not None:
            nll["with the memories, untrained (step 0)"] = 0.0
        cnt = 0
        t0 = time.perf_counter()
        for s in starts:
            seq = ids[s:s + n * T + 1]
            wins = [seq[i * T:(i + 1) * T][None] for i in range(n)]
            x, y = wins[-1], seq[(n - 1) * T + 1:n * T + 1][None]
            mems = [encode(m, w) for w in wins[:-1]]
            for key, mm in (("window only (= the base model)", []), ("with the memories", mems)):
                lg = m(x, memory=UIOMemory(m, mm))
                nll[key] += float(F.cross_entropy(lg.flatten(0, 1).float(), y.flatten(), reduction="sum"))
            # the upper bound: every earlier token as context (n * T fits SmolLM2's 8k window)
            lg = m(seq[None, :n * T])[:, (n - 1) * T:]
            nll["base, full attention over the whole document"] += float(
                F.cross_entropy(lg.flatten(0, 1).float(), y.flatten(), reduction="sum"))
            if fresh is not None:
                lg = fresh(x, memory=UIOMemory(fresh, [encode(fresh, w) for w in wins[:-1]]))
                nll["with the memories, untrained (step 0)"] += float(
                    F.cross_entropy(lg.flatten(0, 1).float(), y.flatten(), reduction="sum"))
            cnt += y.numel()
        out["perplexity"][str(n)] = {k: round(math.exp(v / cnt), 3) for k, v in nll.items()}
        log(f"  {n} windows: {out['perplexity'][str(n)]} ({time.perf_counter() - t0:.0f} s)")
    return out


def format_md(res: dict) -> str:
    ns = res["lengths"]
    keys = list(res["perplexity"][str(ns[0])])
    lines = [f"`{res['command']}` — {res['machine']}", "",
             f"Last-window perplexity on held-out Persuasion ({res['documents']} documents per length), windows of "
             f"{res['window']} tokens, {res['slots_per_window']} memory slots per window and layer:", "",
             "| memory | " + " | ".join(f"{n} windows" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{res['perplexity'][str(n)][k]:.3f}" for n in ns) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a SmolLM2 model trained with UIO (its export or run)")
    ap.add_argument("--base", default="models/smollm2-135m",
                    help="the base model, for the untrained-memory row ('' to skip)")
    ap.add_argument("--docs", type=int, default=12)
    ap.add_argument("--out", default=str(RUNS / "uio_smollm2.json"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = {"command": f"python -m bench.uio_smollm2 --model {args.model}",
           "machine": machine()}
    res.update(run(args.model, base_dir=args.base or None, docs=args.docs))
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    write_results(res, args.out, format_md(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
