"""The real model side by side with the reference implementation: SmolLM2-135M-Instruct in
Folio (training-free retrieval through the store) and in transformers (full attention).

    python -m bench.real [--quick] [--out PATH]

Contexts: --quick 2k and 8k; the full run adds 32k and 128k. Every (implementation,
context) runs in a child process of its own (a clean peak-RSS reading), Folio and
transformers alternating per context. The text is real prose: Austen's training novels
(never the held-out one), cut to each context in SmolLM2's tokens.

Figures (each against a baseline measured in the same run):

  decode_speedup_vs_transformers_<ctx>  per-token decode of transformers' `generate` with
        full attention (its default DynamicCache) over the context / Folio's per-token
        decode (`engine.inference.generate`: search, fetch, attention over sinks + retrieved
        blocks + local window) after ingesting the same tokens. Up to 8k the baseline's cache
        is filled by transformers' own prefill of the same tokens; past it (a quadratic
        prefill) the cache holds random K/V of the right shape — decode time does not
        depend on the values (`baseline_cache` says which).
  prefill_vs_transformers_<ctx>          Folio's ingest tokens/s with the store on (zarr on
        disk, write-behind, index, commits) / transformers' forward over the same tokens
        (8k; 32k in the full run).
  peak_rss_mb_{folio,transformers}_<ctx> peak RSS of each child.

Writes runs/bench/real.json (--out PATH to choose).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import RUNS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = RUNS / "real.json"
MODEL_DIR = ROOT / "models" / "smollm2-135m"
GGUF = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DECODE_STEPS = 16
HF_PREFILL_MAX = {True: 8192, False: 32768}  # quick / full: transformers prefills up to here


def _tokens(n: int) -> list[int]:
    """n SmolLM2 tokens of Austen's training novels (concatenated as needed)."""
    from engine import corpora
    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(MODEL_DIR)
    ids: list[int] = []
    for name in corpora.training_documents("austen") or ["sample:austen-emma"]:
        ids += tok.encode(corpora.load(name))
        if len(ids) >= n:
            break
    if len(ids) < n:  # the samples only: repeat them (the costs measured do not depend on the text)
        ids = (ids * (n // max(1, len(ids)) + 1))
    return ids[:n]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_folio(ctx: int, steps: int) -> dict:
    import torch

    from engine.commands import load_model_arg
    from engine.inference import GenerateConfig, generate, ingest, open_store

    torch.set_grad_enabled(False)
    model, tok = load_model_arg(str(MODEL_DIR))
    ids = _tokens(ctx)
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(Path(tmp) / "store", model.cfg, "a")
        r = ingest(model, store, "doc", ids, tokenizer=tok)
        times = []
        last = time.perf_counter()
        gen = generate(model, store, tok.encode(" Then"), streams=["doc"], tokenizer=tok,
                       gen=GenerateConfig(max_new_tokens=steps + 1))
        for i, _ in enumerate(gen):
            now = time.perf_counter()
            if i:  # the first token comes from the prompt's prefill
                times.append(now - last)
            last = now
        store.close()
    times.sort()
    return {"ingest_tok_s": r.tokens_per_s, "ingest_s": r.seconds, "decode_s_per_token": times[len(times) // 2],
            "decode_steps": len(times), "peak_rss_mb": _peak_rss_mb()}


def child_transformers(ctx: int, steps: int, prefill: bool) -> dict:
    import torch
    import transformers

    from engine.gguf_import import read_gguf

    torch.set_grad_enabled(False)
    ck = read_gguf(GGUF)
    cfg = transformers.LlamaConfig(**ck.config)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.load_state_dict(ck.state_dict, strict=False)
    model.tie_weights()
    del ck
    ids = torch.tensor([_tokens(ctx)])
    out: dict = {}
    if prefill:
        t0 = time.perf_counter()
        res = model(ids, use_cache=True)
        out["prefill_tok_s"] = ctx / (time.perf_counter() - t0)
        cache = res.past_key_values
        out["baseline_cache"] = "transformers' prefill of the same tokens"
        del res
    else:
        cache = transformers.DynamicCache(config=cfg)
        hd = cfg.hidden_size // cfg.num_attention_heads
        g = torch.Generator().manual_seed(0)
        for layer in range(cfg.num_hidden_layers):
            k = torch.randn(1, cfg.num_key_value_heads, ctx, hd, generator=g)
            cache.update(k, torch.randn_like(k), layer)
        out["baseline_cache"] = "random K/V of the right shape (decode time does not depend on them)"
    # generate() continues after the cache: input_ids hold the cached tokens plus the next one
    nxt = torch.cat([ids, torch.tensor([[ids[0, -1].item()]])], dim=1)
    t0 = time.perf_counter()
    model.generate(input_ids=nxt, attention_mask=torch.ones_like(nxt), past_key_values=cache,
                   max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
    out["decode_s_per_token"] = (time.perf_counter() - t0) / steps
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _run_child(kind: str, ctx: int, steps: int, prefill: bool) -> dict:
    cmd = [sys.executable, "-m", "bench.real", "--child", kind, "--ctx", str(ctx), "--steps", str(steps)]
    if prefill:
        cmd.append("--prefill")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if p.returncode != 0:
        raise RuntimeError(f"{kind} child at {ctx} failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2k and 8k only (under a minute or two)")
    ap.add_argument("--out", default=str(RESULTS), help="where to write the JSON")
    ap.add_argument("--steps", type=int, default=DECODE_STEPS)
    ap.add_argument("--child", choices=("folio", "transformers"), help=argparse.SUPPRESS)
    ap.add_argument("--ctx", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--prefill", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        res = (child_folio(args.ctx, args.steps) if args.child == "folio"
               else child_transformers(args.ctx, args.steps, args.prefill))
        print(json.dumps(res))
        return 0
    if not MODEL_DIR.is_dir() or not GGUF.is_file():
        print("bench.real: SmolLM2 is not installed here; run `make model` first", file=sys.stderr)
        return 2
    contexts = [2048, 8192] if args.quick else [2048, 8192, 32768, 131072]
    t_all = time.perf_counter()
    figures: dict = {}
    raw: dict = {}
    for ctx in contexts:
        name = f"{ctx // 1024}k"
        prefill = ctx <= HF_PREFILL_MAX[args.quick]
        print(f"[{name}] folio ...", file=sys.stderr, flush=True)
        f = _run_child("folio", ctx, args.steps, False)
        print(f"[{name}] folio decode {f['decode_s_per_token'] * 1e3:.1f} ms/token, ingest {f['ingest_tok_s']:.0f} "
              f"tok/s; transformers ...", file=sys.stderr, flush=True)
        h = _run_child("transformers", ctx, args.steps, prefill)
        print(f"[{name}] transformers decode {h['decode_s_per_token'] * 1e3:.1f} ms/token"
              + (f", prefill {h['prefill_tok_s']:.0f} tok/s" if prefill else ""), file=sys.stderr, flush=True)
        raw[name] = {"folio": f, "transformers": h}
        figures[f"decode_speedup_vs_transformers_{name}"] = round(h["decode_s_per_token"] / f["decode_s_per_token"], 2)
        if prefill and ctx >= 8192:
            figures[f"prefill_vs_transformers_{name}"] = round(f["ingest_tok_s"] / h["prefill_tok_s"], 3)
        figures[f"peak_rss_mb_folio_{name}"] = round(f["peak_rss_mb"], 1)
        figures[f"peak_rss_mb_transformers_{name}"] = round(h["peak_rss_mb"], 1)
    import torch

    result = {"figures": figures, "raw": raw,
              "goals": {"decode_speedup_vs_transformers_128k": ">= 10", "prefill_vs_transformers_8k": ">= 1.0"},
              "meta": {"command": "python -m bench.real" + (" --quick" if args.quick else ""),
                       "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU", "torch": torch.__version__,
                       "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32)",
                       "decode_steps": args.steps, "wall_s": round(time.perf_counter() - t_all, 1),
                       "date": time.strftime("%Y-%m-%d")}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for k, v in figures.items():
        print(f"{k:42s} {v}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
