"""Incremental truncated BPTT through UIO memories, with a reservoir of live encoder graphs and
the unbiasing factor (UIO-LLMs, arXiv 2406.18173; the spec is ../shared/seeds/UIO.md).

A document runs window by window; J_t is window t's loss and m_s the memory of window s. The
exact gradient is g = sum_t D_t + sum_t sum_{s<t} a_ts, D_t the direct term and
a_ts = (dm_s/dtheta)^T dJ_t/dm_s. Per window t:

1. the decoder of window t gets the earlier memories as detached leaves; those whose encoder
   graph is still alive (the reservoir) have requires_grad, and `J_t.backward()` gives the
   decoder its exact gradient and accumulates dJ_t/dm_s in each live leaf, scaled by
   c_t = max(1, t / S) when the factor is on (a hook on the leaves);
2. window t's encoder runs with a graph if the reservoir keeps t (Algorithm R: t < S kept; else
   j uniform in {0..t}, and if j < S slot j's memory leaves and t takes its place), else under
   no_grad; the draw does not depend on the data;
3. a memory leaving the reservoir runs `m_s.backward(leaf_s.grad)` once through its encoder
   and its graph is freed (one encoder backward per memory: the incremental form, O(T));
   at the document's end the reservoir is flushed.

After windows 0..t-1 the reservoir is a uniform S-subset, so P(s live at J_t) = min(1, S/t),
and the factor makes E[g_hat] = g exactly (tests U1-U4). S = 0 is fully detached memory; the
"window" policy (keep the last S) is deterministic TBPTT, which drops every a_ts, s < t - S.
No optimizer step may run while graphs are alive (in-place updates would invalidate them):
`guard` raises. Gradient clipping after the document re-biases the estimate.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from engine.uio import Memory, UIOMemory, encode

POLICIES = ("reservoir", "window")


class LiveGraphsError(RuntimeError):
    """An optimizer step was attempted while encoder graphs of the document are alive."""


class Reservoir:
    """Which windows' encoder graphs stay alive: at most S of them.

    policy 'reservoir': Algorithm R (uniform S-subset of the windows so far); 'window': the last
    S. draw(t) -> an int uniform in {0..t} (injectable: tests enumerate every draw sequence)."""

    def __init__(self, S: int, *, policy: str = "reservoir", draw: Callable[[int], int] | None = None,
                 seed: int = 0):
        if not isinstance(S, int) or S < 0:
            raise ValueError(f"S={S!r} is invalid: an int >= 0")
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r} is invalid: one of {POLICIES}")
        self.S, self.policy = S, policy
        rng = random.Random(seed)
        self.draw = draw or (lambda t: rng.randint(0, t))
        self.items: list[int] = []

    def offer(self, t: int) -> tuple[bool, int | None]:
        """Window t's memory is made: (keep its graph?, the window whose graph leaves or None)."""
        if self.S == 0:
            return False, None
        if len(self.items) < self.S:
            self.items.append(t)
            return True, None
        if self.policy == "window":
            out = self.items.pop(0)
            self.items.append(t)
            return True, out
        j = self.draw(t)
        if j < self.S:
            out, self.items[j] = self.items[j], t
            return True, out
        return False, None


@dataclass
class DocumentResult:
    losses: list[float] = field(default_factory=list)
    encoder_backwards: int = 0
    max_live: int = 0
    grads: list = field(default_factory=list)


class IncrementalTBPTT:
    """Runs one document at a time through a UIO model and returns the estimated gradient.

    The gradients are taken with `torch.autograd.grad` (never accumulated by autograd into
    .grad), so nothing of a wrapping engine fires mid-document: `run_document` adds them to
    each parameter's .grad by default (plain torch: step the optimizer after it), or returns
    them only (`into_grad=False`), e.g. for a DeepSpeed engine, which then backpropagates the
    surrogate `surrogate_loss(params, grads)` once per document (its gradient is exactly them).

    S, factor: the reservoir size and the unbiasing factor (default: the model's UIOConfig).
    policy/draw/seed: see `Reservoir`."""

    def __init__(self, model, *, S: int | None = None, factor: bool | None = None, policy: str = "reservoir",
                 draw: Callable[[int], int] | None = None, seed: int = 0, params: Sequence[torch.Tensor] | None = None):
        self.model = model
        uio = model.uio.uio
        self.S = uio.S if S is None else S
        self.factor = uio.factor if factor is None else factor
        self.policy, self.draw, self.seed = policy, draw, seed
        self.params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
        self._live: dict[int, Memory] = {}  # window -> its encoder's outputs (with graph)
        self._documents = 0

    @property
    def live_graphs(self) -> int:
        return len(self._live)

    def guard(self, step: Callable) -> Callable:
        """`step` (an optimizer's or engine's) that raises LiveGraphsError while graphs are alive."""
        def guarded(*a, **k):
            if self._live:
                raise LiveGraphsError(f"optimizer step with {len(self._live)} live encoder graphs: step only "
                                      f"after run_document() returns (in-place updates would invalidate them)")
            return step(*a, **k)
        return guarded

    def factor_at(self, t: int) -> float:
        """c_t = max(1, t / S) with the factor on and S > 0, else 1."""
        return max(1.0, t / self.S) if self.factor and self.S > 0 else 1.0

    def _add(self, acc: list, grads) -> None:
        for i, g in enumerate(grads):
            if g is not None:
                acc[i] = g if acc[i] is None else acc[i] + g

    def _release(self, s: int, leaves: list[Memory], leaf_grads: dict[int, list], acc: list) -> None:
        """Window s's memory leaves the reservoir: one backward through its encoder; its leaf
        becomes a constant for the windows still to come."""
        outs = self._live.pop(s)
        grads = leaf_grads.pop(s, None)
        if grads is not None:
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            if pairs:
                self._add(acc, torch.autograd.grad([o for o, _ in pairs], self.params,
                                                   grad_outputs=[g for _, g in pairs], allow_unused=True))
                self._backwards += 1
        leaves[s] = [leaf.detach() for leaf in leaves[s]]

    def run_document(self, windows: Sequence[tuple[torch.Tensor, torch.Tensor]],
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                     into_grad: bool = True) -> DocumentResult:
        """windows: (inputs (B, T), targets (B, T)) in order. Returns the per-window losses and
        the gradient estimate (`DocumentResult.grads`, one per parameter, None if unused), also
        added to .grad unless into_grad=False."""
        if self._live:
            raise LiveGraphsError("run_document() while another document's graphs are alive")
        res = DocumentResult()
        self._backwards = 0
        reservoir = Reservoir(self.S, policy=self.policy, draw=self.draw, seed=self.seed + self._documents)
        self._documents += 1
        leaves: list[Memory] = []
        leaf_grads: dict[int, list] = {}  # live window -> accumulated dJ/dm per layer
        acc: list = [None] * len(self.params)
        n = len(windows)
        try:
            for t, (x, y) in enumerate(windows):
                mem = UIOMemory(self.model, leaves)
                J = loss_fn(self.model(x, memory=mem), y)
                live = sorted(self._live)
                inputs = [leaf for s in live for leaf in leaves[s]]
                if J.requires_grad:  # a frozen base without memories has nothing to train (window 0)
                    got = torch.autograd.grad(J, self.params + inputs, allow_unused=True)
                    self._add(acc, got[:len(self.params)])
                    c = self.factor_at(t)
                    nl = len(leaves[0]) if leaves else 0
                    for k, s in enumerate(live):
                        part = got[len(self.params) + k * nl: len(self.params) + (k + 1) * nl]
                        part = [None if g is None else g * c for g in part]
                        prev = leaf_grads.get(s)
                        leaf_grads[s] = part if prev is None else [
                            a if b is None else (b if a is None else a + b) for a, b in zip(prev, part)]
                res.losses.append(float(J.detach()))
                if t == n - 1:
                    break  # the last window's memory has no reader
                keep, out = reservoir.offer(t)
                if out is not None:
                    self._release(out, leaves, leaf_grads, acc)
                if keep:
                    outs = encode(self.model, x)
                    self._live[t] = outs
                    leaves.append([o.detach().requires_grad_(True) for o in outs])
                else:
                    with torch.no_grad():
                        leaves.append(encode(self.model, x))
                res.max_live = max(res.max_live, len(self._live))
            for s in sorted(self._live):
                self._release(s, leaves, leaf_grads, acc)
        finally:
            self._live.clear()
        res.encoder_backwards = self._backwards
        res.grads = acc
        if into_grad:
            for p, g in zip(self.params, acc):
                if g is not None:
                    p.grad = g.clone() if p.grad is None else p.grad + g
        return res


def surrogate_loss(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """sum_p <p, g_p> with g detached: its gradient wrt each p is exactly g_p (one backward of it
    hands a document's estimate to an engine that owns the backward, e.g. DeepSpeed ZeRO-2)."""
    terms = [(p * g.detach().to(p.dtype)).sum() for p, g in zip(params, grads) if g is not None]
    if not terms:
        raise ValueError("surrogate_loss: the document produced no gradient")
    return torch.stack(terms).sum()


def full_bptt(model, windows: Sequence[tuple[torch.Tensor, torch.Tensor]],
              loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
    """The exact gradient g: one graph over the document, memories not detached (reference)."""
    mems: list[Memory] = []
    total = 0.0
    J_all = None
    for t, (x, y) in enumerate(windows):
        J = loss_fn(model(x, memory=UIOMemory(model, mems)), y)
        J_all = J if J_all is None else J_all + J
        total += float(J.detach())
        if t < len(windows) - 1:
            mems.append(encode(model, x))
    J_all.backward()
    return total


__all__ = ["IncrementalTBPTT", "LiveGraphsError", "Reservoir", "DocumentResult", "full_bptt", "surrogate_loss",
           "POLICIES"]
