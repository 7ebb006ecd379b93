"""Needle evaluation on a tiny random causal model with the byte tokenizer and the built-in
samples: haystack length and needle depth, key formats and grading, the held-out default,
the shared-prefix runners against a plain ingest / one forward, and the output files."""

from __future__ import annotations

import json
import random

import pytest
import torch

from engine import corpora
from engine.config import ModelConfig
from engine.inference import GenerateConfig, generate, ingest, open_store
from engine.model import LandmarkTransformer
from tests.engine._models import tiny_causal_model
from engine.needle import (KEY_FORMATS, WORDS, HaystackSource, NeedleConfig, build_trials, find_key, format_table,
                           is_correct, is_key, make_key, needle_sentence, run_needle, split_sentences, write_outputs)
from engine.needle_answers import answers_from_store, answers_full, greedy_from_cache
from engine.tokenizer import ByteTokenizer
from engine.training_free import TrainingFreeConfig

L = 8
TOK = ByteTokenizer()
SAMPLES = ("sample:austen-persuasion", "sample:sotu-1947-truman")  # both held out; ~40 sentences
RC = TrainingFreeConfig(top_k=2, local_blocks=2, sink_blocks=1, chunk_len=16)


def _model(seed: int = 0) -> LandmarkTransformer:
    return tiny_causal_model(seed, block_len=L)


@pytest.fixture(scope="module")
def source() -> HaystackSource:
    return HaystackSource(TOK, SAMPLES)


def _specs(depths, rng, formats=KEY_FORMATS):
    return [(f, d, make_key(f, rng)) for d in depths for f in formats]


def test_key_formats_parse_and_sit_in_their_sentences():
    rng = random.Random(0)
    for fmt in KEY_FORMATS:
        for _ in range(50):
            key = make_key(fmt, rng)
            assert is_key(fmt, key), (fmt, key)
            sentence = needle_sentence(fmt, key)
            assert sentence.count(key) == 2 and find_key(fmt, sentence) == key
    assert all(is_key("word", w) for w in WORDS)
    assert 5 <= len(make_key("passkey", rng)) <= 7 and not is_key("passkey", "1234")
    assert is_key("code", "K7Q-42M") and not is_key("code", "K7Q42M")
    with pytest.raises(ValueError, match="unknown"):
        make_key("uuid", rng)


def test_grading_needs_the_whole_key():
    assert is_correct("The pass key is 48213.", "48213")
    assert not is_correct("The pass key is 148213.", "48213")
    assert not is_correct("The pass key is 4821.", "48213")
    assert is_correct("The secret word is Pineapple!", "pineapple")
    assert not is_correct("The secret word is pineapples", "pineapple")
    assert is_correct("code: K7Q-42M", "K7Q-42M") and not is_correct("K7Q-42", "K7Q-42M")


def test_held_out_text_is_the_default():
    cfg = NeedleConfig()
    assert cfg.text == ("austen:persuasion",)
    assert all(corpora.is_held_out(n) for n in cfg.text)


def test_config_validation_names_the_field():
    for bad, field in ((dict(lengths=[]), "lengths"), (dict(depths=[1.5]), "depths"), (dict(trials=0), "trials"),
                       (dict(formats=("uuid",)), "formats"), (dict(modes=("full", "full")), "modes"),
                       (dict(text=("nope",)), "nope")):
        with pytest.raises(ValueError, match=field):
            NeedleConfig(**bad)
    cfg = NeedleConfig(full_max_len=8192, full_beyond=(12000,))
    assert cfg.modes_for(8192) == ("retrieval", "full", "local")
    assert cfg.modes_for(12000) == ("retrieval", "full", "local") and cfg.modes_for(32768) == ("retrieval", "local")
    assert cfg.local().top_k == 0 and cfg.local().sink_blocks == 0


def test_sentences_are_whole():
    s = split_sentences('He came.  "Did he?" she said.\nYes!  Then\nhe left.')
    assert s == ['He came.', '"Did he?"', 'she said.', 'Yes!', 'Then he left.']


@pytest.mark.parametrize("n", [300, 800, 1500])
def test_haystack_has_the_requested_length(source, n):
    rng = random.Random(n)
    trials, facts = build_trials(TOK, source, n, _specs([0.5], rng), rng)
    longest = max(len(e) for e in source.encoded)
    for t in trials:
        # whole sentences only: at most one sentence (and the shorter needles' slack) short of n
        assert n - longest - 40 < t.n_tokens <= n, (t.n_tokens, n)
        assert len(t.document) + len(t.question) == t.n_tokens
        assert TOK.decode(t.question).startswith(t.question and "What is the")
    assert not facts["wrapped"]


def test_a_haystack_longer_than_the_text_wraps(source):
    rng = random.Random(0)
    trials, facts = build_trials(TOK, source, 2 * source.total, _specs([0.5], rng, ("passkey",)), rng)
    assert facts["wrapped"] and trials[0].n_tokens > source.total + 100


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_the_needle_sits_at_the_requested_depth(source, depth):
    rng = random.Random(1)
    trials, _ = build_trials(TOK, source, 1500, _specs([depth], rng), rng)
    longest = max(len(e) for e in source.encoded)
    for t in trials:
        assert abs(t.actual_depth - depth) <= longest / len(t.hay) / 2 + 1e-9
        doc = t.document
        assert doc[t.needle_pos:t.needle_pos + len(t.needle)] == t.needle
        assert t.key in TOK.decode(t.needle)
        text = TOK.decode(doc)
        assert text.count(t.key) == 2  # only the needle holds the key
    if depth == 0.0:
        assert trials[0].cut == 0
    if depth == 1.0:
        assert trials[0].cut == len(trials[0].hay)


def _fresh_store_answers(m, trials, rc, max_new: int, where) -> list[str]:
    """Each trial's whole document ingested into a fresh store, then asked: the reference the
    shared-prefix runner must reproduce."""
    out = []
    for i, t in enumerate(trials):
        with open_store(where / f"s{i}", m.cfg, "w") as store, torch.no_grad():
            ingest(m, store, "doc", t.document, retrieval=rc, tokenizer=TOK)
            out.append(TOK.decode(generate(m, store, t.question, streams=["doc"], retrieval=rc,
                                           gen=GenerateConfig(max_new_tokens=max_new), tokenizer=TOK)))
    return out


def test_shared_prefix_store_runner_matches_a_fresh_ingest(source, tmp_path):
    """The trunk store copied and continued per trial gives the answers of ingesting each
    trial's whole document into a fresh store."""
    m = _model()
    rng = random.Random(2)
    trials, _ = build_trials(TOK, source, 700, _specs([0.0, 0.5, 1.0], rng, ("passkey", "code")), rng)
    assert len({t.needle_pos // 16 for t in trials}) == 3  # three fork points of the trunk
    got = answers_from_store(m, TOK, trials, RC, 8, lambda: None)
    for i, want in enumerate(_fresh_store_answers(m, trials, RC, 8, tmp_path)):
        assert got[i][0] == want, (i, got[i][0], want)


def test_shared_prefix_full_runner_matches_one_forward(source):
    m = _model()
    rng = random.Random(3)
    trials, _ = build_trials(TOK, source, 300, _specs([0.2, 0.9], rng, ("word",)), rng)
    got = answers_full(m, TOK, trials, 6, lambda: None)
    for i, t in enumerate(trials):
        ids = t.document + t.question
        with torch.no_grad():
            cache = m.new_cache(1, len(ids) + 8)
            logits = m(torch.tensor([ids]), cache=cache)[0, -1]
            want = TOK.decode(greedy_from_cache(m, TOK, cache, logits, 6))
        assert got[i][0] == want


def test_run_needle_rows_grading_and_outputs(source, tmp_path):
    m = _model()
    cfg = NeedleConfig(lengths=[300, 200], depths=[0.0, 1.0], trials=1, modes=("retrieval", "full", "local"),
                       full_max_len=250, retrieval=RC, text=SAMPLES, max_new_tokens=4)
    updates = []
    result = run_needle(m, TOK, cfg, progress=False, source=source, on_update=lambda r: updates.append(len(r["trials"])))
    # 200: three modes, 300: no full (past full_max_len); 2 depths x 3 formats each
    assert len(result["trials"]) == (3 + 2) * 2 * 3 and updates[-1] == len(result["trials"])
    assert [r["length"] for r in result["rows"]][0] == 200  # shortest first
    assert not any(r["mode"] == "full" and r["length"] == 300 for r in result["rows"])
    for rec in result["trials"]:
        assert rec["correct"] == is_correct(rec["answer"], rec["key"])
    for row in result["rows"]:
        mine = [r for r in result["trials"] if (r["length"], r["depth"], r["format"], r["mode"])
                == (row["length"], row["depth"], row["format"], row["mode"])]
        assert row["accuracy"] == sum(r["correct"] for r in mine) / len(mine)
    assert result["machine"]["cpu_count"] >= 1 and result["machine"]["torch"] == torch.__version__
    assert result["config"]["held_out"] and result["config"]["retrieval"]["top_k"] == 2
    table = format_table(result)
    assert "| 300 |" in table and "retrieval" in table
    paths = write_outputs(result, tmp_path / "out")
    assert {p.name for p in paths} == {"needle.json", "needle.md", "needle.png"}
    assert json.loads((tmp_path / "out" / "needle.json").read_text())["rows"] == result["rows"]
    assert (tmp_path / "out" / "needle.png").stat().st_size > 1000


def test_the_command_line_builds_the_config():
    from engine.commands import needle_config
    from train.cli import build_parser

    args = build_parser().parse_args(["eval", "needle", "--model", "m", "--lengths", "4k,8k,128k",
                                      "--depths", "0,0.5,1", "--formats", "passkey,code", "--modes",
                                      "retrieval,local", "--full-beyond", "12k", "--top-k", "16", "--block-key",
                                      "max-norm", "--search-distance", "1024", "--query-agg", "max",
                                      "--decode-reselect", "4"])
    cfg = needle_config(args)
    assert cfg.lengths == [4000, 8000, 128000] and cfg.depths == [0.0, 0.5, 1.0]
    assert cfg.formats == ("passkey", "code") and cfg.modes == ("retrieval", "local") and cfg.full_beyond == (12000,)
    rc = cfg.retrieval
    assert (rc.top_k, rc.block_key, rc.search_distance, rc.query_agg, rc.decode_reselect) == (16, "max-norm", 1024,
                                                                                               "max", 4)
    assert cfg.text == ("austen:persuasion",)
    with pytest.raises(ValueError, match="lengths"):
        needle_config(build_parser().parse_args(["eval", "needle", "--model", "m", "--lengths", "4q"]))


def _landmark_model(seed: int = 0) -> LandmarkTransformer:
    from engine.config import preset

    torch.manual_seed(seed)
    return LandmarkTransformer(preset("tiny", n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, ffn_hidden=64,
                                      max_seq_len=32, block_len=L)).eval()


def test_a_landmark_model_runs_its_own_retrieval_and_skips_full(source, tmp_path):
    """A landmark fine-tune goes through landmark retrieval: the shared-prefix runner equals a
    fresh ingest + generate with the landmark RetrievalConfig, and `full` is skipped."""
    from engine.needle_answers import memory_config
    from engine.retrieval import RetrievalConfig

    m = _landmark_model()
    rc = memory_config(m.cfg, RC)
    assert isinstance(rc, RetrievalConfig) and rc.top_k == RC.top_k
    rng = random.Random(4)
    trials, _ = build_trials(TOK, source, 300, _specs([0.1, 0.8], rng, ("passkey",)), rng)
    got = answers_from_store(m, TOK, trials, RC, 6, lambda: None)
    for i, want in enumerate(_fresh_store_answers(m, trials, rc, 6, tmp_path)):
        assert got[i][0] == want
    cfg = NeedleConfig(lengths=[200], depths=[0.5], modes=("retrieval", "full", "local"), retrieval=RC,
                       text=SAMPLES, max_new_tokens=3, formats=("code",))
    result = run_needle(m, TOK, cfg, progress=False, source=source)
    assert sorted(r["mode"] for r in result["rows"]) == ["local", "retrieval"]


def test_mode_config_gives_a_landmark_model_its_landmark_retrieval():
    from engine.config import preset
    from engine.needle import NeedleConfig
    from engine.needle_answers import mode_config
    from engine.retrieval import RetrievalConfig
    from engine.training_free import TrainingFreeConfig

    lm = RetrievalConfig(top_k=3, sink_blocks=2)
    cfg = NeedleConfig(retrieval=TrainingFreeConfig(top_k=8), landmark=lm)
    landmark, causal = preset("tiny"), preset("tiny", attention="causal")
    assert mode_config(cfg, "retrieval", landmark) is lm
    assert mode_config(cfg, "retrieval", causal) is cfg.retrieval
    assert mode_config(cfg, "local", landmark).top_k == 0
    assert mode_config(NeedleConfig(), "retrieval", landmark) is not None
    with pytest.raises(ValueError, match="landmark must be None or a RetrievalConfig"):
        NeedleConfig(landmark=TrainingFreeConfig())
