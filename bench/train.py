"""Training benchmark: throughput of the DeepSpeed trainer against a plain PyTorch loop.

    python -m bench.train [--quick] [--only throughput|retrieval|lora] [--out PATH]

Every configuration trains the same model on the same windows (the tiny preset on
passkey + stdlib, windows of 512, 4 lanes) in this process; the configurations
alternate in rounds and each reports tokens/s from its median step time after warmup. Figures, each a ratio against a baseline measured
in the same run:

  tokens_per_s                         per configuration (padding excluded)
  ds_zero0_vs_plain_step_time          DeepSpeed, ZeRO-0, no offload / plain torch AdamW loop
  ds_zero2_offload_vs_plain_step_time  DeepSpeed, ZeRO-2, optimizer on CPU (the default
                                       ds_config) / plain torch loop

  step_time_retrieval_vs_none          train step with retrieval from the store / the
                                       same step without (goal <= 1.3)
  lora.step_time_retrieval_vs_none     the same for the LoRA fine-tuning step of SmolLM2-135M
                                       (the smollm2-landmark preset), and its tokens/s
Runs on the allocator `folio train` runs on (engine/runtime.py: jemalloc, keeping freed
pages, when the machine has it; FOLIO_MALLOC=system for glibc's malloc): it re-executes
itself with it first. The JSON's `machine` says which.
Writes runs/bench/train.json (--out PATH to choose).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # before torch loads: the allocator `folio train` runs on
    from engine import runtime

    runtime.enter(["-m", "bench.train", *sys.argv[1:]], training=True)

import torch  # noqa: E402

from bench import RUNS  # noqa: E402
from engine.runtime import active  # noqa: E402
from train.config import TrainConfig, train_preset  # noqa: E402
from train.data import DocumentMixer, build_source  # noqa: E402
from train.loop import DSOptions, LanguageModelLoss, default_model_factory, lr_multiplier, train  # noqa: E402
from train.windows import LaneBatcher  # noqa: E402

RESULTS = RUNS / "train.json"


ROUNDS = {True: 4, False: 8}  # configurations alternate in rounds: a noisy spell hits all of them
STEPS = {True: 8, False: 16}  # per configuration per round


def _config(quick: bool, out: str) -> TrainConfig:
    # plain windows (no store): the baseline loop below has no retrieval either
    return train_preset("tiny-demo", max_steps=STEPS[quick], warmup_steps=2, save_every=0,
                        eval_windows=0, retrieval=False, out_dir=out)


def plain_torch_step_times(tcfg: TrainConfig) -> tuple[list[float], list[int]]:
    """The baseline: the same model and batches through a plain torch AdamW loop."""
    torch.manual_seed(tcfg.seed)
    mcfg = tcfg.model_config()
    model = LanguageModelLoss(default_model_factory(mcfg))
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=(0.9, 0.95), weight_decay=tcfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(tcfg))
    sources = [build_source(s, seed=tcfg.seed, synthetic_chars=tcfg.synthetic_chars) for s in tcfg.data]
    batcher = LaneBatcher(DocumentMixer(sources, tcfg.data_weights, seed=tcfg.seed), lanes=tcfg.micro_batch,
                          window=tcfg.window, block_len=mcfg.block_len)
    times, tokens = [], []
    for _ in range(tcfg.max_steps):
        t0 = time.perf_counter()
        batch = batcher.next_batch()
        loss = model(batch.tokens, batch.targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        batcher.advance(batch)
        times.append(time.perf_counter() - t0)
        tokens.append(batch.n_tokens)
    return times, tokens


def deepspeed_step_times(tcfg: TrainConfig, ds: DSOptions) -> tuple[list[float], list[int]]:
    """Step times of `folio train` with these DeepSpeed options (from its metrics)."""
    from train.metrics import read_metrics

    train(tcfg, ds=ds, progress=False)
    recs = read_metrics(Path(tcfg.out_dir) / "metrics.jsonl")
    return [r["step_time_s"] for r in recs], [r["tokens"] for r in recs]


def measure_throughput(quick: bool, tmp: Path) -> dict[str, Any]:
    """tokens/s of the plain loop, DeepSpeed ZeRO-0, and ZeRO-2 with CPU optimizer offload.

    The three run one after the other, ROUNDS times; each figure is the median of the
    step times after each run's first WARMUP steps, pooled over rounds.
    """
    warmup = 2
    configs: dict[str, Callable[[TrainConfig], tuple[list[float], list[int]]]] = {
        "plain_torch": plain_torch_step_times,
        "ds_zero0": lambda c: deepspeed_step_times(c, DSOptions(zero_stage=0, offload="none")),
        "ds_zero2_offload": lambda c: deepspeed_step_times(c, DSOptions()),  # the shipped ds_config
    }
    times: dict[str, list[float]] = {k: [] for k in configs}
    tokens: dict[str, list[int]] = {k: [] for k in configs}
    per_round: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(ROUNDS[quick]):
        for name, fn in configs.items():
            t, n = fn(_config(quick, str(tmp / f"{name}-{r}")))
            times[name].extend(t[warmup:])
            tokens[name].extend(n[warmup:])
            per_round[name].append(round(statistics.median(t[warmup:]), 5))
    step = {k: statistics.median(v) for k, v in times.items()}
    tok = {k: statistics.mean(v) for k, v in tokens.items()}
    return {
        "tokens_per_s": {k: round(tok[k] / step[k], 1) for k in configs},
        "median_step_time_s": {k: round(step[k], 5) for k in configs},
        "median_step_time_s_per_round": per_round,  # a round far off the others was disturbed
        "ds_zero0_vs_plain_step_time": round(step["ds_zero0"] / step["plain_torch"], 3),
        "ds_zero2_offload_vs_plain_step_time": round(step["ds_zero2_offload"] / step["plain_torch"], 3),
    }


def measure_retrieval(quick: bool, tmp: Path) -> dict[str, Any]:
    """Train step with retrieval from the store / the same step without, same data.

    Both run `folio train` (ZeRO-2, optimizer offloaded: the shipped ds_config) on
    documents of several windows each, alternating in rounds; medians after warmup.
    With retrieval every window from a document's second on searches the landmark index,
    pulls top-k blocks per layer and KV head from the store, and attends over them.
    """
    warmup = 2
    times: dict[str, list[float]] = {"none": [], "retrieval": []}
    per_round: dict[str, list[float]] = {"none": [], "retrieval": []}
    pulled: list[int] = []
    for r in range(ROUNDS[quick]):
        for name in times:
            cfg = train_preset("tiny-demo", max_steps=STEPS[quick], warmup_steps=2, save_every=0,
                               eval_windows=0, out_dir=str(tmp / f"retr-{name}-{r}"),
                               synthetic_chars=(1500, 4000), retrieval=name == "retrieval")
            train(cfg, ds=DSOptions(), progress=False)
            from train.metrics import read_metrics

            recs = read_metrics(Path(cfg.out_dir) / "metrics.jsonl")[warmup:]
            times[name].extend(r_["step_time_s"] for r_ in recs)
            per_round[name].append(statistics.median(r_["step_time_s"] for r_ in recs))
            if name == "retrieval":
                pulled.extend(sum(r_["pulled_bytes"].values()) for r_ in recs)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "step_time_retrieval_vs_none": round(med["retrieval"] / med["none"], 3),
        "median_step_time_s_retrieval": round(med["retrieval"], 5),
        "median_step_time_s_no_retrieval": round(med["none"], 5),
        "retrieval_bytes_pulled_per_step": int(statistics.mean(pulled)) if pulled else 0,
        # each round's own ratio (its two runs back to back): the spread shows the machine's noise
        "step_time_retrieval_vs_none_per_round": [round(a / b, 3) for a, b in zip(per_round["retrieval"], per_round["none"])],
    }


LORA_ROUNDS = {True: 1, False: 2}
LORA_STEPS = {True: 5, False: 10}


def measure_lora(quick: bool, tmp: Path) -> dict[str, Any]:
    """The fine-tuning step: SmolLM2-135M with landmarks, LoRA (the smollm2-landmark preset:
    rank 8 on wq/wk/wv/wo, window 512, 2 lanes, ZeRO-2 with the optimizer on the CPU), with
    retrieval of earlier windows from the store / the same step without; alternating rounds,
    medians after warmup. Skipped (with the reason) when models/smollm2-135m is not made."""
    from train.metrics import read_metrics

    base = Path("models/smollm2-135m")
    if not (base / "config.json").is_file():
        return {"lora": {"skipped": f"{base} does not exist (`make model` makes it)"}}
    warmup = 2
    times: dict[str, list[float]] = {"none": [], "retrieval": []}
    tokens: dict[str, list[int]] = {"none": [], "retrieval": []}
    per_round: dict[str, list[float]] = {"none": [], "retrieval": []}
    for r in range(LORA_ROUNDS[quick]):
        for name in times:
            cfg = train_preset("smollm2-landmark", init_from=str(base), max_steps=LORA_STEPS[quick], warmup_steps=2,
                               save_every=0, out_dir=str(tmp / f"lora-{name}-{r}"), retrieval=name == "retrieval")
            train(cfg, ds=DSOptions(), progress=False)
            recs = read_metrics(Path(cfg.out_dir) / "metrics.jsonl")[warmup:]
            times[name].extend(r_["step_time_s"] for r_ in recs)
            tokens[name].extend(r_["tokens"] for r_ in recs)
            per_round[name].append(statistics.median(r_["step_time_s"] for r_ in recs))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"lora": {
        "setup": "smollm2-landmark preset: SmolLM2-135M, LoRA r=8 on wq,wk,wv,wo + landmark row, window 512, "
                 "2 lanes, ZeRO-2 optimizer offload, fp32",
        "tokens_per_s_retrieval": round(statistics.mean(tokens["retrieval"]) / med["retrieval"], 1),
        "tokens_per_s_no_retrieval": round(statistics.mean(tokens["none"]) / med["none"], 1),
        "step_time_retrieval_vs_none": round(med["retrieval"] / med["none"], 3),
        "step_time_retrieval_vs_none_per_round": [round(a / b, 3) for a, b in zip(per_round["retrieval"], per_round["none"])],
    }}


# name -> function(quick, tmp dir) -> dict of figures
MEASUREMENTS: dict[str, Callable[[bool, Path], dict[str, Any]]] = {
    "throughput": measure_throughput,
    "retrieval": measure_retrieval,
    "lora": measure_lora,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (under 60 s)")
    ap.add_argument("--out", default=str(RESULTS), help="where to write the JSON")
    ap.add_argument("--only", choices=sorted(MEASUREMENTS), action="append",
                    help="run only these measurements (repeatable; default all)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cfg = _config(args.quick, "unused")
    results: dict[str, Any] = {
        "command": "python -m bench.train" + (" --quick" if args.quick else ""),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "cuda": torch.cuda.is_available(), "threads": torch.get_num_threads(),
                    "allocator": active(), "malloc_conf": os.environ.get("MALLOC_CONF", "")},
        "setup": {"model": cfg.model, "window": cfg.window, "micro_batch": cfg.micro_batch,
                  "steps_per_round": cfg.max_steps, "rounds": ROUNDS[args.quick], "data": list(cfg.data)},
    }
    with tempfile.TemporaryDirectory(prefix="folio-bench-train-") as tmp:
        for name, fn in MEASUREMENTS.items():
            if args.only and name not in args.only:
                continue
            results.update(fn(args.quick, Path(tmp)))
            print(f"[{name}] done after {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
