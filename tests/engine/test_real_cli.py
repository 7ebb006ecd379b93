"""The real-model path from the command line: import -> ingest -> ask -> export --format hf, on a
random Hugging Face checkpoint the test writes (tests/engine/test_convert.py's), no download."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.engine.test_convert import SENTENCES, _make  # noqa: E402
from train.cli import main  # noqa: E402


def test_import_ingest_ask_export(tmp_path, capsys):
    hf_dir, ref = _make(tmp_path, "llama")
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{% for m in messages %}<s>{{ m.role }}: {{ m.content }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant: {% endif %}"}))
    out = tmp_path / "folio-model"
    assert main(["import", str(hf_dir), "--out", str(out), "--block-len", "8"]) == 0
    assert "chat template yes" in capsys.readouterr().out
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(SENTENCES * 6))
    store = tmp_path / "store"
    assert main(["ingest", "--model", str(out), "--store", str(store), str(doc), "--no-progress",
                 "--top-k", "2", "--local-blocks", "2", "--chunk", "16"]) == 0
    assert "tokens ingested" in capsys.readouterr().out
    assert main(["ask", "--model", str(out), "--store", str(store), "--stream", "doc.txt", "What?",
                 "--max-tokens", "4", "--top-k", "2"]) == 0
    capsys.readouterr()
    # the Hugging Face directory itself works as --model (imported in memory, default block_len 64): the
    # store written with blocks of 8 refuses it, naming both layouts; a store of its own works
    assert main(["ask", "--model", str(hf_dir), "--store", str(store), "--stream", "doc.txt", "What?"]) == 2
    assert "block_len=8" in capsys.readouterr().err
    assert main(["ingest", "--model", str(hf_dir), "--store", str(tmp_path / "s64"), str(doc), "--no-progress"]) == 0
    assert main(["ask", "--model", str(hf_dir), "--store", str(tmp_path / "s64"), "What?", "--max-tokens", "2"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(hf_dir), "--store", str(tmp_path / "s2"), "hi", "--max-tokens", "2"]) == 2
    assert "no Folio store" in capsys.readouterr().err
    hf_out = tmp_path / "hf"
    assert main(["export", str(out), "--format", "hf", "--out", str(hf_out)]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(hf_out).eval()
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert (back(ids).logits[..., :-1] - ref(ids).logits).abs().max() < 1e-4


def test_landmark_flags_are_refused_for_the_other_kind(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("some text " * 20)
    assert main(["ingest", "--model", "random:tiny", "--store", str(tmp_path / "s"), str(doc),
                 "--block-key", "mean", "--no-progress"]) == 2
    assert "--block-key" in capsys.readouterr().err
    # sinks apply to both kinds: a landmark model's ingest takes them
    assert main(["ingest", "--model", "random:tiny", "--store", str(tmp_path / "s2"), str(doc),
                 "--sink-blocks", "1", "--no-progress"]) == 0
    assert main(["eval", "passkey", "--model", str(tmp_path / "missing")]) == 2
    assert "no such directory or .gguf file" in capsys.readouterr().err


def test_a_second_ingest_into_a_store_being_written_is_refused(tmp_path, capsys):
    from engine.config import preset
    from engine.inference import open_store

    doc = tmp_path / "doc.txt"
    doc.write_text("some text " * 20)
    holder = open_store(tmp_path / "s", preset("tiny"), "a")  # another writer holds the store
    try:
        assert main(["ingest", "--model", "random:tiny", "--store", str(tmp_path / "s"), str(doc),
                     "--no-progress", "--wait", "0.2"]) == 2
        err = capsys.readouterr().err
        assert "already open for writing" in err and f"pid {__import__('os').getpid()}" in err
    finally:
        holder.close()
    assert main(["ingest", "--model", "random:tiny", "--store", str(tmp_path / "s"), str(doc), "--no-progress"]) == 0
