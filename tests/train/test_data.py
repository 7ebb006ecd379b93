"""Document sources: generators, files, folders, JSONL, the stdlib corpus, the mixer."""

from __future__ import annotations

import json
import random
import re

import pytest

from train.data import DocumentMixer, FileSource, SyntheticSource, build_source, stdlib_files, stdlib_source
from train.errors import DataError
from train.tasks import (PAPER_FILLER, PASSKEY_INTRO, PASSKEY_QUESTION, filler_sentence, passkey_prompt,
                         recall_document)


def test_passkey_prompt_follows_the_paper_format():
    prompt, answer = passkey_prompt(random.Random(1), 2000, depth=0.5, key=4242)
    assert prompt.startswith(PASSKEY_INTRO) and prompt.endswith(PASSKEY_QUESTION)
    assert "The pass key is 4242. Remember it. 4242 is the pass key." in prompt
    assert answer == " 4242."
    assert 1800 <= len(prompt) <= 2300
    mid = prompt.index("The pass key is 4242")
    assert 0.35 < mid / len(prompt) < 0.65  # depth 0.5 puts it near the middle


def test_filler_is_varied_beyond_the_papers_five_sentences():
    rng = random.Random(0)
    sentences = {filler_sentence(rng) for _ in range(500)}
    assert len(sentences - set(PAPER_FILLER)) > 200
    assert set(PAPER_FILLER) & sentences  # the paper's sentences are among them


def test_recall_document_answers_match_facts():
    doc = recall_document(random.Random(3), 1500)
    facts = dict(re.findall(r"Key (\w{3}) holds (\d+)\.", doc))
    queries = re.findall(r"What does (\w{3}) hold\? \1 holds (\d+)\.", doc)
    assert len(facts) >= 10 and queries
    for k, v in queries:
        assert facts[k] == v


def test_repeat_document_answer_is_the_second_copy():
    from train.data import build_source

    src = build_source("repeat:answer_weight=3", seed=2, synthetic_chars=(100, 300))
    for i in range(20):
        doc = src.document(i)
        assert 100 - 30 <= len(doc.text) <= 300 + 30, len(doc.text)
        (a, b), = doc.answer_spans
        first = doc.text[len("Copy this: "): a - len(" Once more: ")]
        assert doc.text[a:b] == first and doc.text[:a].endswith(" Once more: ") and b == len(doc.text)
        assert doc.answer_weight == 3
    assert src.document(4).text == build_source("repeat", seed=2, synthetic_chars=(100, 300)).document(4).text
    assert src.document(4).text != src.document(5).text


def test_synthetic_source_is_a_pure_function_of_seed_and_index():
    a = SyntheticSource("passkey", seed=5, chars=(300, 600))
    b = SyntheticSource("passkey", seed=5, chars=(300, 600))
    assert a.document(7) == b.document(7)
    assert a.document(7) != a.document(8)
    assert 300 <= len(a.document(9).text) <= 800


def test_folder_source_reads_text_and_skips_binary_and_empty(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub" / "b.md").write_text("beta text")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / ".hidden").write_text("secret")
    src = FileSource([tmp_path], seed=0)
    assert len(src) == 2
    texts = {src.document(i).text for i in range(2)}
    assert texts == {"alpha text", "beta text"}
    # the next epoch visits every document again, in another seeded order
    assert {src.document(i).text for i in range(2, 4)} == texts


def test_jsonl_source_one_document_per_record(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"body": f"doc {i}"}) for i in range(5)) + "\n\n")
    src = build_source(str(p), seed=1, jsonl_field="body")
    assert sorted(src.document(i).text for i in range(5)) == [f"doc {i}" for i in range(5)]


def test_jsonl_missing_field_is_named(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(DataError, match=rf"{p}:1: record has no string field 'body'"):
        build_source(str(p), seed=0, jsonl_field="body")


def test_missing_path_and_no_text_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_source(str(tmp_path / "nope"), seed=0)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "z.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match="holds no text"):
        build_source(str(tmp_path / "e"), seed=0)


def test_stdlib_corpus_has_a_disjoint_heldout_split():
    train, held = stdlib_files("train"), stdlib_files("heldout")
    assert len(train) > 300 and len(held) > 20
    assert not set(train) & set(held)
    assert all(f.suffix == ".py" for f in train[:50])
    assert 0.05 < len(held) / (len(train) + len(held)) < 0.15
    doc = stdlib_source("heldout", seed=0).document(0)
    assert doc.name.startswith("stdlib-heldout:") and doc.text


def test_mixer_is_deterministic_weighted_and_splits_draws_between_ranks():
    srcs = [SyntheticSource("passkey", seed=0, chars=(200, 300)), SyntheticSource("recall", seed=0, chars=(200, 300))]
    m = DocumentMixer(srcs, [3.0, 1.0], seed=2)
    draws = [m.draw() for _ in range(400)]
    share = sum(1 for _, s, _ in draws if s == 0) / len(draws)
    assert 0.65 < share < 0.85
    # per-source indices are consecutive: every document of a source is used once
    assert [loc for _, s, loc in draws if s == 1] == list(range(sum(1 for _, s, _ in draws if s == 1)))
    m2 = DocumentMixer(srcs, [3.0, 1.0], seed=2)
    m2.draw()
    state = m2.state_dict()
    m3 = DocumentMixer(srcs, [3.0, 1.0], seed=2)
    m3.load_state_dict(state)
    assert [m3.draw() for _ in range(10)] == draws[1:11]
    r0 = DocumentMixer(srcs, [3.0, 1.0], seed=2, rank=0, world_size=2)
    r1 = DocumentMixer(srcs, [3.0, 1.0], seed=2, rank=1, world_size=2)
    got = sorted([r0.draw() for _ in range(50)] + [r1.draw() for _ in range(50)])
    assert got == draws[:100]


def test_passkey_key_digits_cover_one_to_five_digit_keys():
    from train.tasks import random_key

    rng = random.Random(0)
    keys = [random_key(rng, (1, 5)) for _ in range(2000)]
    assert {len(str(k)) for k in keys} == {1, 2, 3, 4, 5}
    assert max(keys) > 50000  # beyond the paper's 1..50000: the eval's 5-digit keys
    with pytest.raises(ValueError, match="key_digits"):
        random_key(rng, (0, 3))


def test_synthetic_spec_options_mark_answer_spans():
    plain = build_source("passkey", seed=2, synthetic_chars=(150, 460))
    weighted = build_source("passkey:answer_weight=16", seed=2, synthetic_chars=(150, 460))
    for i in range(5):
        a, b = plain.document(i), weighted.document(i)
        assert a.text == b.text and a.answer_spans == () and a.answer_weight == 1
        (lo, hi), = b.answer_spans
        assert b.answer_weight == 16 and hi == len(b.text)
        assert re.fullmatch(r" \d+\.", b.text[lo:hi])
        assert b.text[:lo].endswith(PASSKEY_QUESTION)
    digits = build_source("passkey:key_digits=5-5", seed=2, synthetic_chars=(150, 460))
    assert all(re.search(r"pass key is (\d{5})\.$", digits.document(i).text) for i in range(5))
    recall = build_source("recall:answer_weight=4", seed=2, synthetic_chars=(600, 900)).document(0)
    facts = dict(re.findall(r"Key (\w{3}) holds (\d+)\.", recall.text))
    answers = [recall.text[lo:hi] for lo, hi in recall.answer_spans]
    assert answers and all(a.rstrip(".") in facts.values() for a in answers)


def test_a_source_of_its_own_lengths_draws_its_own_documents():
    short = build_source("passkey", seed=2, synthetic_chars=(150, 460))
    long = build_source("passkey:chars=2000-3000", seed=2, synthetic_chars=(150, 460))
    assert all(150 <= len(short.document(i).text) <= 600 for i in range(6))
    assert all(1900 <= len(long.document(i).text) <= 3200 for i in range(6))
    # not the short source's documents stretched: their keys differ
    key = re.compile(r"pass key is (\d+)\.")
    assert [key.search(short.document(i).text)[1] for i in range(6)] != [
        key.search(long.document(i).text)[1] for i in range(6)]


@pytest.mark.parametrize("spec", ["passkey:answer_weight=0", "passkey:weight=3", "passkey:key_digits=x",
                                  "recall:key_digits=1-5", "passkey:answer_weight", "passkey:chars=9-3",
                                  "needles:chars=0-10", "passkey:distractors=4-2", "recall:distractors=1-2"])
def test_bad_synthetic_options_are_value_errors_naming_the_spec(spec):
    with pytest.raises(ValueError, match="is invalid"):
        build_source(spec, seed=0)


def test_passkey_with_real_prose_filler_uses_training_text_only():
    from engine import corpora
    from train.tasks import PAPER_FILLER

    src = build_source("passkey:answer_weight=8,key_digits=1-7,filler=prose", seed=0, synthetic_chars=(400, 2000))
    held = " ".join(corpora.load(n) for n in corpora.held_out_documents("austen"))[:200000]
    for i in range(8):
        doc = src.document(i)
        (a, b), = doc.answer_spans
        key = doc.text[a:b].strip(" .")
        assert doc.text.count(f"The pass key is {key}. Remember it.") == 1
        assert not any(f in doc.text for f in PAPER_FILLER) and ".." not in doc.text
        probe = doc.text[160:220]
        assert probe not in held  # not the held-out novel
    with pytest.raises(ValueError, match="filler"):
        build_source("recall:filler=prose", seed=0)


@pytest.mark.parametrize("filler", ["generator", "prose"])
def test_passkey_distractors_hold_other_numbers_never_the_key(filler):
    """distractors=LO-HI: sentences with numbers that are not the key, inside the filler; the
    key sentence stays whole and once; the answer span is still the key."""
    from train.tasks import distractor_sentence

    rng = random.Random(0)
    for _ in range(300):
        key = rng.randrange(1, 10 ** 7)
        sent = distractor_sentence(rng, key)
        assert "pass key" not in sent and str(key) not in re.findall(r"\d+", sent)
    src = build_source(f"passkey:answer_weight=8,key_digits=1-7,filler={filler},distractors=3-3", seed=0,
                       synthetic_chars=(600, 1500))
    plain = build_source(f"passkey:answer_weight=8,key_digits=1-7,filler={filler}", seed=0,
                         synthetic_chars=(600, 1500))
    more = 0
    for i in range(8):
        doc = src.document(i)
        (a, b), = doc.answer_spans
        key = doc.text[a:b].strip(" .")
        assert doc.text.count(f"The pass key is {key}. Remember it. {key} is the pass key.") == 1
        assert ".." not in doc.text and doc.text.endswith(PASSKEY_QUESTION + f" {key}.")
        body = doc.text[len(PASSKEY_INTRO):a]
        nums = [n for n in re.findall(r"\d+", body) if n != key]
        more += len(nums) - len([n for n in re.findall(r"\d+", plain.document(i).text[len(PASSKEY_INTRO):])
                                 if n != key])
    assert more >= 8 * 3  # every document gained at least three sentences of other numbers
