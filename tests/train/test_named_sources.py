"""train.data with the named corpora of engine.corpora: 'sample', 'austen', held-out specs, one document."""

from __future__ import annotations

import pytest

from engine.corpora import held_out_documents, is_held_out, read_manifest, training_documents
from train.data import NamedDocumentSource, build_source
from train.errors import DataError


def test_sample_sources_respect_the_held_out_split():
    train, held = build_source("sample", seed=0), build_source("sample-heldout", seed=0)
    assert isinstance(train, NamedDocumentSource) and len(train) == len(training_documents("sample"))
    train_names = {train.document(i).name for i in range(2 * len(train))}
    assert train_names == set(training_documents("sample"))
    assert not any(is_held_out(n) for n in train_names)
    assert {held.document(i).name for i in range(len(held))} == set(held_out_documents("sample"))
    # a pure function of (seed, i), each document once per epoch
    again = build_source("sample", seed=0)
    assert [again.document(i) for i in range(4)] == [train.document(i) for i in range(4)]


def test_one_document_by_name():
    src = build_source("sample:austen-emma", seed=3)
    doc = src.document(0)
    assert len(src) == 1 and doc.name == "sample:austen-emma" and doc.text.startswith("EMMA")
    assert build_source("stdlib:json/decoder.py", seed=0).document(5).name == "stdlib:json/decoder.py"


def test_unknown_or_unfetched_names_are_data_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="not a built-in sample"):
        build_source("sample:austen-nope", seed=0)
    monkeypatch.setenv("FOLIO_DATA", str(tmp_path))
    with pytest.raises(DataError, match="holds no documents.*folio data fetch"):
        build_source("austen", seed=0)
    with pytest.raises(DataError, match="not fetched"):
        build_source("austen:emma", seed=0)


@pytest.mark.skipif(read_manifest("austen") is None, reason="austen not fetched (scripts/fetch_data.sh)")
def test_austen_trains_on_five_novels_and_holds_out_persuasion():
    train = build_source("austen", seed=0)
    assert len(train) == 5
    assert "austen:persuasion" not in {train.document(i).name for i in range(5)}
    assert build_source("austen-heldout", seed=0).document(0).name == "austen:persuasion"
