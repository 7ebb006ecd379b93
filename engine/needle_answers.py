"""How each needle mode answers a batch of trials that share one haystack.

Only the needle and what follows it differ between the trials of one length and trial number,
so the shared prefix is computed once: `full` rewinds its KV cache to the needle, and the store
modes (`retrieval`, `local`) ingest the prefix (up to a chunk boundary, where a resumed ingest
computes exactly what an uninterrupted one would) into a trunk store that each trial copies and
continues. Each function returns (answer, seconds) per trial, the prefix's time shared out.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.inference import CHAT_META, GenerateConfig, generate, ingest, open_store
from engine.kv_cache import KVCache
from engine.model import LandmarkTransformer
from engine.tokenizer import ByteTokenizer, Tokenizer
from engine.training_free import TrainingFreeConfig

if TYPE_CHECKING:
    from engine.needle import NeedleTrial

STREAM = "doc"
"""The stream name a trial's document is ingested under."""


def _store_config():
    from memory_store import StoreConfig

    # the store is temporary, deleted after its trial: syncing it to disk buys nothing
    return StoreConfig(sync_mode="none")


def answers_from_store(model: LandmarkTransformer, tok: Tokenizer, trials: Sequence[NeedleTrial],
                       rc: TrainingFreeConfig, max_new: int, done: Callable[[], None]) -> list[tuple[str, float]]:
    """(answer, seconds) per trial: ingest + ask, the shared prefix ingested once into a trunk store."""
    cfg = model.cfg
    rc = memory_config(cfg, rc)
    chunk = rc.chunk_len if rc.chunk_len is not None else rc.chunk_for(cfg)
    step = math.lcm(cfg.block_len, chunk)  # a resumed ingest is exact from such a position
    trunk_ids = trials[0].head + trials[0].hay
    gen = GenerateConfig(max_new_tokens=max_new)
    kw = dict(retrieval=rc, tokenizer=tok, source=STREAM, meta_update={CHAT_META: True}, flush_interval_s=1e9)
    out: list[tuple[str, float] | None] = [None] * len(trials)
    trunk_s = 0.0
    with tempfile.TemporaryDirectory(prefix="folio-needle-") as d:
        trunk_path, branch_path = Path(d) / "trunk", Path(d) / "branch"
        open_store(trunk_path, cfg, "w", config=_store_config()).close()
        have = 0
        for i in sorted(range(len(trials)), key=lambda i: trials[i].needle_pos):
            t = trials[i]
            fork = t.needle_pos // step * step
            if fork > have:
                t0 = time.perf_counter()
                with open_store(trunk_path, cfg, "a", config=_store_config()) as trunk:
                    ingest(model, trunk, STREAM, trunk_ids[:fork], **kw)
                have, trunk_s = fork, trunk_s + time.perf_counter() - t0
            t0 = time.perf_counter()
            shutil.copytree(trunk_path, branch_path)
            with open_store(branch_path, cfg, "a", config=_store_config()) as store:
                ingest(model, store, STREAM, t.document, **kw)  # continues after the trunk's `fork` tokens
                ids = list(generate(model, store, t.question, streams=[STREAM], retrieval=rc, gen=gen, tokenizer=tok))
            shutil.rmtree(branch_path)
            out[i] = (tok.decode(ids), time.perf_counter() - t0)
            done()
    return [(a, s + trunk_s / len(trials)) for a, s in out]


def mode_config(ecfg, mode: str, model_cfg):
    """The config a store mode ('retrieval' or 'local') of an evaluation config (`NeedleConfig`,
    `PerplexityConfig`: .retrieval, .landmark, .local()) runs with: a landmark-trained model's
    `retrieval` takes ecfg.landmark when one is given (see `memory_config`)."""
    if mode != "retrieval":
        return ecfg.local()
    if model_cfg.landmarks and ecfg.landmark is not None:
        return ecfg.landmark
    return ecfg.retrieval


def memory_config(cfg, rc: TrainingFreeConfig):
    """The retrieval config a store mode uses: `rc` for a causal model; for a landmark-trained
    one its landmark retrieval with rc's top_k (0 = the local window alone), the window and
    prefill chunk of its training (`RetrievalConfig` defaults from max_seq_len)."""
    from engine.retrieval import RetrievalConfig

    if not cfg.landmarks or isinstance(rc, RetrievalConfig):
        return rc
    return RetrievalConfig(top_k=rc.top_k)


def _prefill(model: LandmarkTransformer, cache: KVCache, ids: Sequence[int], chunk: int = 1024) -> torch.Tensor | None:
    """Run `ids` through the cache in chunks (bounded logits memory); the last position's logits (V,)."""
    logits = None
    dev = model.tok_emb.weight.device
    for a in range(0, len(ids), chunk):
        logits = model(torch.tensor([ids[a:a + chunk]], device=dev), cache=cache)[0, -1]
    return logits


def greedy_from_cache(model: LandmarkTransformer, tok: Tokenizer, cache: KVCache, logits: torch.Tensor,
                      max_new: int) -> list[int]:
    """Greedy decoding with full attention after a prefill whose last logits are `logits` (V,);
    stops at the tokenizer's end of sequence (not the byte tokenizer's, as `generate`)."""
    banned = torch.tensor(tok.never_sampled(), dtype=torch.long)
    eos = None if isinstance(tok, ByteTokenizer) else tok.eos_id
    out: list[int] = []
    dev = model.tok_emb.weight.device
    for _ in range(max_new):
        lg = logits.float().clone()
        lg[banned] = float("-inf")
        t = int(lg.argmax())
        if t == eos:
            break
        out.append(t)
        logits = model(torch.tensor([[t]], device=dev), cache=cache)[0, -1]
    return out


def answers_full(model: LandmarkTransformer, tok: Tokenizer, trials: Sequence[NeedleTrial], max_new: int,
                 done: Callable[[], None]) -> list[tuple[str, float]]:
    """(answer, seconds) per trial with the model's own attention; the shared prefix is
    prefilled once and the cache rewound to it after each trial."""
    cache = model.new_cache(1, max(t.n_tokens for t in trials) + max_new + 1)
    trunk_ids = trials[0].head + trials[0].hay
    out: list[tuple[str, float] | None] = [None] * len(trials)
    have, trunk_s = 0, 0.0
    for i in sorted(range(len(trials)), key=lambda i: trials[i].needle_pos):
        t = trials[i]
        t0 = time.perf_counter()
        cache.length = have  # rewind: positions past the shared prefix belong to the last trial
        _prefill(model, cache, trunk_ids[have:t.needle_pos])
        have = t.needle_pos
        t1 = time.perf_counter()
        logits = _prefill(model, cache, t.document[have:] + t.question)
        ids = greedy_from_cache(model, tok, cache, logits, max_new)
        trunk_s += t1 - t0
        out[i] = (tok.decode(ids), time.perf_counter() - t1)
        done()
    return [(a, s + trunk_s / len(trials)) for a, s in out]
