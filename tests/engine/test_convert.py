"""Importing Hugging Face checkpoints: logits equal transformers' (float32, 1e-4).

Every checkpoint here is random-initialised by transformers in the test (no download): GQA,
tied and untied embeddings, Llama 3 rope scaling, Mistral, Qwen2's QKV bias. transformers is
a test dependency only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine.checkpoint import load_model  # noqa: E402
from engine.convert import config_from_hf, export_hf, import_checkpoint, save_imported  # noqa: E402
from engine.errors import CheckpointError, UnsupportedCheckpointError  # noqa: E402
from engine.tokenizer import LANDMARK_TOKEN, load_tokenizer  # noqa: E402

SENTENCES = ["It is a truth universally acknowledged, that a single man in possession of a good fortune,",
             "must be in want of a wife. However little known the feelings or views of such a man may be",
             "def main(argv):\n    return 0  # code, too", "Ünïcödé and emoji 🙂 survive"]


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 20, trainer)
    return tok


def _make(tmp_path, arch: str = "llama", *, vocab: int = 320, **over):
    """A random checkpoint directory written by transformers; returns (dir, hf model)."""
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, rms_norm_eps=1e-5,
                  bos_token_id=0, eos_token_id=1)
    common.update(over)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(sliding_window=None, **common)
        model = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(use_sliding_window=False, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # random biases and norms, so a dropped one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0, 0.5 if name.endswith("bias") else 1.0)
    d = tmp_path / arch
    model.save_pretrained(d, safe_serialization=True)
    _tokenizer(300).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return d, model.eval()


def _ids(n: int = 40, vocab: int = 300) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (2, n), generator=g)


CASES = {
    "llama-gqa-untied": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama3-rope-scaling": ("llama", {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    "llama-attention-bias": ("llama", {"attention_bias": True}),
    "mistral": ("mistral", {}),
    "qwen2-qkv-bias": ("qwen2", {"tie_word_embeddings": True}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_transformers(tmp_path, case):
    arch, over = CASES[case]
    d, ref = _make(tmp_path, arch, **over)
    model, tok = import_checkpoint(d)
    ids = _ids(200 if "rope" in case else 40)  # past original_max_position_embeddings=64
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids)
    assert got.shape[-1] == want.shape[-1] + 1  # the landmark's row
    diff = (got[..., :-1] - want).abs()
    assert diff.max() < 1e-4, f"{case}: max {diff.max():.2e} mean {diff.mean():.2e}"
    assert tok.landmark_id == model.cfg.vocab_size - 1


def test_incremental_decoding_equals_one_forward(tmp_path):
    d, _ = _make(tmp_path, "llama")
    model, _ = import_checkpoint(d)
    ids = _ids(30)[:1]
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, 64)
        parts = [model(ids[:, :17], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(17, 30)]
    inc = torch.cat(parts, dim=1)
    assert (inc - full).abs().max() < 1e-4


def test_tokenizer_ids_equal_the_checkpoints(tmp_path):
    from tokenizers import Tokenizer

    d, _ = _make(tmp_path, "llama")
    _, tok = import_checkpoint(d)
    ref = Tokenizer.from_file(str(d / "tokenizer.json"))
    for s in SENTENCES:
        assert tok.encode(s) == ref.encode(s, add_special_tokens=False).ids
        assert tok.decode(tok.encode(s)) == ref.decode(ref.encode(s).ids)
    # the landmark's name in a document is text, never the landmark
    assert tok.landmark_id not in tok.encode(f"a {LANDMARK_TOKEN} b")
    assert tok.encode(LANDMARK_TOKEN, specials=True) == [tok.landmark_id]


def test_save_and_reload_folio_directory(tmp_path):
    d, ref = _make(tmp_path, "llama")
    model, tok = import_checkpoint(d)
    out = save_imported(model, tok, tmp_path / "folio")
    again = load_model(out)
    tok2 = load_tokenizer(out)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    assert tok2.landmark_id == tok.landmark_id and tok2.encode(SENTENCES[0]) == tok.encode(SENTENCES[0])
    assert again.cfg.source == model.cfg.source and model.cfg.source.startswith("llama#")


@pytest.mark.parametrize("case", ["llama-tied", "llama-gqa-untied", "qwen2-qkv-bias"])
def test_export_hf_loads_in_transformers_with_equal_logits(tmp_path, case):
    arch, over = CASES[case]
    d, _ = _make(tmp_path, arch, **over)
    model, tok = import_checkpoint(d)
    out = export_hf(model, tok, tmp_path / "hf-out")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.cat([_ids(), torch.full((2, 1), tok.landmark_id)], dim=1)  # the landmark id is valid there too
    with torch.no_grad():
        assert (back(ids).logits - model(ids)).abs().max() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.convert_tokens_to_ids(LANDMARK_TOKEN) == tok.landmark_id
    assert hf_tok(SENTENCES[1], add_special_tokens=False)["input_ids"] == tok.encode(SENTENCES[1])


def test_unsupported_fields_are_named(tmp_path):
    base = dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, vocab_size=100)
    with pytest.raises(UnsupportedCheckpointError, match="architectures"):
        config_from_hf({**base, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedCheckpointError, match="hidden_act"):
        config_from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(UnsupportedCheckpointError, match="rope_scaling.rope_type"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(UnsupportedCheckpointError, match="sliding_window"):
        config_from_hf({**base, "architectures": ["MistralForCausalLM"], "sliding_window": 4096})
    with pytest.raises(UnsupportedCheckpointError, match="head_dim"):
        config_from_hf({**base, "head_dim": 32})
    with pytest.raises(CheckpointError, match="not a Hugging Face checkpoint"):
        import_checkpoint(tmp_path / "nothing-here")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text(json.dumps(base))
    (tmp_path / "pickled" / "tokenizer.json").write_text(_tokenizer(300).to_str())
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04not read")
    with pytest.raises(UnsupportedCheckpointError, match="never unpickles"):
        import_checkpoint(tmp_path / "pickled")


SMOLLM2 = Path(__file__).resolve().parents[2] / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
PROSE = ("Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement, "
         "never took up any book but the Baronetage; there he found occupation for an idle hour, and "
         "consolation in a distressed one.")


@pytest.mark.skipif(not SMOLLM2.is_file(), reason="SmolLM2 not fetched (make model)")
def test_smollm2_logits_equal_transformers_and_decode_incrementally():
    """The real model: Folio's import of the GGUF file against transformers' Llama built from the
    same dequantized weights (engine.gguf_import's own test checks those equal transformers'
    GGUF loader), on real prose, and incremental decoding against one forward."""
    from engine.gguf_import import read_gguf

    model, tok = import_checkpoint(SMOLLM2)
    ck = read_gguf(SMOLLM2)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ck.config)).eval()
    missing, unexpected = ref.load_state_dict(ck.state_dict, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ref.tie_weights()
    ids = torch.tensor([tok.encode(PROSE)])
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids)
        cache = model.new_cache(1, ids.shape[1])
        inc = torch.cat([model(ids[:, :20], cache=cache)] +
                        [model(ids[:, t:t + 1], cache=cache) for t in range(20, ids.shape[1])], dim=1)
    diff = (got[..., :-1] - want).abs()
    assert diff.max() < 1e-4, f"max {diff.max():.2e} mean {diff.mean():.2e}"
    assert (inc - got).abs().max() < 1e-4
    assert model.cfg.n_layers == 30 and model.cfg.vocab_size == 49153 and tok.chat_parts() is not None
