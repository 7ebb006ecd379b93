"""Perplexity scorer on a tiny random causal model with the byte tokenizer and a built-in
sample: retrieval that sees every block (no sinks) equals full attention token by token
(see test_training_free.py::test_every_block_retrieved_equals_full_attention), the local
window differs, the document and defaults, and the output files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine import corpora
from engine.model import LandmarkTransformer
from tests.engine._models import tiny_causal_model
from engine.perplexity import (PerplexityConfig, build_document, default_texts, format_table, paired_delta,
                               run_perplexity, score_full, score_store, write_outputs)
from engine.tokenizer import ByteTokenizer
from engine.training_free import TrainingFreeConfig

L = 8
TOK = ByteTokenizer()
TEXTS = ("sample:sotu-1947-truman", "sample:austen-persuasion")
ALL_BLOCKS = TrainingFreeConfig(top_k=64, local_blocks=2, sink_blocks=0, chunk_len=24)


def _model(seed: int = 0) -> LandmarkTransformer:
    return tiny_causal_model(seed, block_len=L)


@pytest.mark.parametrize("context", [200, 203, 256])  # the context's tail: partial, partial, none
def test_retrieval_of_every_block_equals_full_attention(tmp_path, context):
    m = _model()
    ids, _ = build_document(TOK, 400, TEXTS)
    seq = ids[-(context + 40):]
    with torch.no_grad():
        want = score_full(m, seq, 40, chunk=64)
        got, _ = score_store(m, TOK, seq, 40, ALL_BLOCKS, tmp_path / "s")
    assert got.shape == want.shape == (40,)
    diff = (got - want).abs()
    assert diff.max() < 1e-4, f"max {diff.max():.2e} mean {diff.mean():.2e}"


def test_full_scoring_is_one_forward():
    m = _model()
    ids, _ = build_document(TOK, 300, TEXTS)
    seq = torch.tensor(ids[-300:])
    with torch.no_grad():
        logits = m(seq[None, :-1])[0]
        # the landmark (the last row) is left out of the softmax: it is never a prediction
        want = torch.nn.functional.cross_entropy(logits[-50:, :-1], seq[-50:], reduction="none").double()
        got = score_full(m, seq.tolist(), 50, chunk=37)
    assert (got - want).abs().max() < 1e-4


def test_full_scoring_past_the_trained_range_slides_a_window_of_c_positions():
    m = _model()
    ids, _ = build_document(TOK, 300, TEXTS)
    seq = torch.tensor(ids[-300:])
    n, scored, window, chunk = 300, 100, 150, 40
    with torch.no_grad():
        got = score_full(m, seq.tolist(), scored, chunk=chunk, window=window)
        whole = score_full(m, seq.tolist(), scored, chunk=chunk)
        assert got.shape == whole.shape == (scored,)
        first = n - scored  # the first scored token's index in seq
        for j in (0, 17, 39, 40, 61, 99):
            t = first + j
            end = min(first - 1 + (j // chunk + 1) * chunk, n - 1)  # its chunk's input end
            seen = t - (end - window)  # tokens before it in its window
            assert window - chunk + 1 <= seen <= window
            logits = m(seq[None, t - seen:t])[0, -1]
            want = torch.nn.functional.cross_entropy(logits[None, :-1], seq[t:t + 1]).double()
            assert abs(float(got[j]) - float(want)) < 1e-4, (j, seen)
    assert (got - whole).abs().max() > 1e-3  # the window cut what the whole sequence sees
    with pytest.raises(ValueError, match="window"):
        score_full(m, seq.tolist(), scored, window=0)


def test_run_marks_the_sliding_full_window():
    m = _model()
    cfg = PerplexityConfig(contexts=[96, 160], scored_tokens=64, full_max_len=200, modes=("full",), texts=TEXTS)
    rows = {r["context"]: r for r in run_perplexity(m, TOK, cfg, progress=False)["rows"]}
    assert rows[96]["full_window"] is None and rows[160]["full_window"] == 160  # 96 + 64 fits in 200, 160 + 64 not


def test_run_rows_local_differs_and_outputs(tmp_path):
    m = _model()
    local = PerplexityConfig(contexts=[128, 320], scored_tokens=48, full_max_len=200, local_max_len=None,
                             retrieval=ALL_BLOCKS, texts=TEXTS)
    result = run_perplexity(m, TOK, local, progress=False)
    cells = {(r["mode"], r["context"]): r for r in result["rows"]}
    assert set(cells) == {("full", 128), ("retrieval", 128), ("retrieval", 320), ("local", 128), ("local", 320)}
    for r in result["rows"]:
        assert len(r["nll_tokens"]) == 48 and math.isclose(r["ppl"], math.exp(r["nll"]), rel_tol=1e-3)
    assert abs(cells[("retrieval", 128)]["ppl"] - cells[("full", 128)]["ppl"]) < 1e-3 * cells[("full", 128)]["ppl"]
    assert abs(cells[("local", 128)]["nll"] - cells[("full", 128)]["nll"]) > 1e-3  # the window is 2 blocks + chunk
    mean, se = paired_delta(cells[("retrieval", 128)], cells[("full", 128)])
    assert abs(mean) < 1e-4 and se >= 0
    assert result["config"]["held_out"] and result["config"]["texts"] == [TEXTS[-1]]  # the only one needed
    assert result["machine"]["torch"] == torch.__version__
    table = format_table(result)
    assert "| 320 |" in table and "Δnll vs full 128" in table
    paths = write_outputs(result, tmp_path / "out")
    assert {p.name for p in paths} == {"perplexity.json", "perplexity.md", "perplexity.png"}
    assert json.loads(paths[0].read_text())["rows"] == result["rows"]


def test_the_document_and_the_defaults():
    ids, used = build_document(TOK, 100, TEXTS)
    assert used == [TEXTS[-1]]  # the last text alone is long enough
    ids2, used2 = build_document(TOK, len(ids) + 10, TEXTS)
    assert used2 == list(TEXTS) and ids2[-len(ids):] == ids  # added in front: same scored tokens
    with pytest.raises(ValueError, match="fewer than"):
        build_document(TOK, 10**7, TEXTS)
    names = [n for n in default_texts()]
    assert names[-1] == "austen:persuasion" and all(corpora.is_held_out(n) for n in names)


def test_config_validation():
    for bad, field in ((dict(contexts=[]), "contexts"), (dict(modes=("nope",)), "modes"),
                       (dict(scored_tokens=0), "scored_tokens"), (dict(texts=("bad",)), "bad")):
        with pytest.raises(ValueError, match=field):
            PerplexityConfig(**bad)
    cfg = PerplexityConfig(contexts=[8192, 1024, 131072], full_max_len=8192, local_max_len=32768)
    assert cfg.cells() == [("full", 1024), ("full", 8192), ("retrieval", 1024), ("retrieval", 8192),
                           ("retrieval", 131072), ("local", 1024), ("local", 8192)]


def test_the_command_line_builds_the_config():
    from engine.commands import perplexity_config
    from train.cli import build_parser

    cfg = perplexity_config(build_parser().parse_args(["eval", "perplexity", "--model", "m", "--contexts",
                                                       "1k,8k,128k", "--local-max-len", "none",
                                                       "--local-blocks", "32"]))
    assert cfg.contexts == [1000, 8000, 128000] and cfg.local_max_len is None and cfg.texts is None
    assert cfg.retrieval.local_blocks == 32 and cfg.local().local_blocks == 32 and cfg.local().top_k == 0


def test_a_landmark_model_scored_through_the_store_equals_one_forward(tmp_path):
    """Retrieving every stored block at its true position, the store path's NLL equals a plain
    landmark-attention forward over the landmarked tokens, read off the position before each
    token (a landmark position predicts the token after its block)."""
    from engine.config import preset
    from engine.landmarks import insert_landmarks
    from engine.retrieval import RetrievalConfig

    torch.manual_seed(0)
    m = LandmarkTransformer(preset("tiny", n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, ffn_hidden=64,
                                   max_seq_len=256, block_len=L)).eval()
    ids, _ = build_document(TOK, 200, TEXTS)
    seq = ids[-150:]
    with torch.no_grad():
        every = RetrievalConfig(top_k=100, positions="true", chunk_len=24)
        got, _ = score_store(m, TOK, seq, 40, every, tmp_path / "s")
        x = insert_landmarks(torch.tensor(seq), L, TOK.landmark_id)
        logits = m(x[None, :-1], impl="blockwise")[0]
        keep = x[1:] != TOK.landmark_id
        want = torch.nn.functional.cross_entropy(logits[keep][:, :-1], x[1:][keep], reduction="none")[-40:]
    assert got.shape == (40,) and (got - want.double()).abs().max() < 1e-4
    # the scored tokens' perplexity runs (full is for causal models and is skipped)
    res = run_perplexity(m, TOK, PerplexityConfig(contexts=[100, 300], scored_tokens=32, texts=TEXTS,
                                                  retrieval=TrainingFreeConfig(top_k=2)), progress=False)
    assert {r["mode"] for r in res["rows"]} == {"retrieval", "local"}
