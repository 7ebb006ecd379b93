"""What a run reports: a progress bar, metrics as JSONL, a loss-curve PNG.

`metrics.jsonl` has one JSON object per optimizer step: step, loss, lr, tokens,
tokens_per_s, step_time_s, and `pulled_bytes` per store tier (device/host/disk: what retrieval moved that step; 0
without a store). On resume, lines of steps after the
resumed step are dropped first, so the file always describes one consistent run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TIERS = ("device", "host", "disk")


_TIER_LABEL = {"device": "dev", "host": "host", "disk": "disk"}


def _human_bytes(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}G"


class MetricsLog:
    """Appends one JSON line per step to `path`."""

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            keep = [ln for ln in read_metrics(self.path) if ln["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        self._f = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl, in file order."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


class Progress:
    """A tqdm bar over optimizer steps: loss, tokens/s, bytes pulled from each store tier."""

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, record: dict[str, Any]) -> None:
        if self.bar is None:
            return
        pulled = record.get("pulled_bytes", {})
        self.bar.set_postfix_str(
            f"loss={record['loss']:.4f} tok/s={record['tokens_per_s']:.0f} pulled "
            + " ".join(f"{_TIER_LABEL.get(t, t)}:{_human_bytes(pulled.get(t, 0))}" for t in TIERS), refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_loss(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """Write the loss curve of a metrics.jsonl as a PNG (matplotlib Agg). None if no records."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, lw=1, alpha=0.5, label="loss")
    if len(losses) >= 10:  # a moving average reads better than the raw noisy curve
        k = max(5, len(losses) // 20)
        avg = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
               for i in range(len(losses))]
        ax.plot(steps, avg, lw=2, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(png_path)
    fig.savefig(out)
    plt.close(fig)
    return out
