"""GGUF import: tiny models written the way llama.cpp's converter writes them, read back and
compared with the originals (weights, logits, token ids); the real SmolLM2 file compared with
transformers' own GGUF loader (a test-only dependency: the importer never imports it)."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

from engine.gguf_import import read_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType
REAL = Path(__file__).resolve().parents[2] / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "It's 2024 and we'll test 123 numbers.",
    "Landmark attention keeps a block's summary token.", "def forward(self, x): return x + 1",
    "Tokenizers split text into pieces; merges glue them back together.",
    "She said: don't stop, we've only just begun!", "A naïve café serves crème brûlée.",
] * 4
SENTENCES = [
    "The lazy fox's summary: 42 blocks, 7 landmarks.", "Unseen wörds like Ωμέγα and 日本語 🤖 still encode.",
    "  two  spaces\tand a tab\n\nnewlines ", "<|im_start|>user\nhello<|im_end|>\n", "don't WE'LL x+1==2",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# HF parameter path -> GGUF name, as llama.cpp's tensor map has it (written out here, not
# imported from the code under test)
LAYER_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)  # model.layers.{i}.{module}.{kind}
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_TO_GGUF[module]}.{kind}"


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's half-split rotary rows -> ggml's pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_level_tokenizer(pre: str) -> Tokenizer:
    """A tiny trained byte-level BPE with the pre-tokenizer HF's tokenizer.json has for `pre`."""
    tok = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre in ("gpt-2", "smollm"))
    tok.pre_tokenizer = {
        "gpt-2": byte_level,
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"), byte_level]),
        "qwen2": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"), byte_level]),
    }[pre]
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=420, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def _byte_level_fields(tok: Tokenizer, pre: str) -> dict:
    """The tokenizer.* metadata llama.cpp's _set_vocab_gpt2 writes for `tok`."""
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in SPECIALS else 1 for t in tokens],
        "tokenizer.ggml.merges": [" ".join(m) for m in merges],
        "tokenizer.ggml.bos_token_id": vocab["<|im_start|>"], "tokenizer.ggml.eos_token_id": vocab["<|im_end|>"],
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": TEMPLATE,
    }


def _sentencepiece_fields() -> dict:
    """A SentencePiece-style vocabulary (scores, byte tokens, no merges), as _set_vocab_sentencepiece
    writes one: <unk> <s> </s>, <0x00>..<0xFF>, then pieces best first."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    vocab = tok.get_vocab()
    pieces = sorted(vocab, key=vocab.get)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    return {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
    }


def _add_kv(w: "gguf.GGUFWriter", key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, list(value))


def _write_gguf(path: Path, model, fields: dict, *, arch: str = "llama", quant: dict | None = None,
                drop: tuple[str, ...] = ()) -> dict:
    """Write `model` as llama.cpp would: its metadata keys (then `fields`: the tokenizer's, and
    overrides; `drop` left out), Q/K permuted (llama only), an
    output tensor only when untied, `quant` = {gguf name: ggml type} quantized. Returns the
    arrays written, by GGUF name (quantized ones as their blocks)."""
    c = model.config
    meta = {
        f"{arch}.context_length": c.max_position_embeddings, f"{arch}.embedding_length": c.hidden_size,
        f"{arch}.block_count": c.num_hidden_layers, f"{arch}.feed_forward_length": c.intermediate_size,
        f"{arch}.attention.head_count": c.num_attention_heads,
        f"{arch}.attention.head_count_kv": c.num_key_value_heads,
        f"{arch}.rope.freq_base": float(c.rope_parameters["rope_theta"]),
        f"{arch}.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
        f"{arch}.vocab_size": c.vocab_size, "general.file_type": 0,
    }
    if arch == "llama":
        meta[f"{arch}.rope.dimension_count"] = c.head_dim
    meta.update(fields)
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        if key not in drop:
            _add_kv(w, key, value)
    written = {}
    sd = model.state_dict()
    for hf, t in sd.items():
        if hf == "lm_head.weight" and c.tie_word_embeddings:
            continue
        name, a = _gguf_name(hf), t.detach().float().numpy().copy()
        if arch == "llama" and ".attn_q." in name:
            a = _llamacpp_permute(a, c.num_attention_heads)
        elif arch == "llama" and ".attn_k." in name:
            a = _llamacpp_permute(a, c.num_key_value_heads)
        if quant and name in quant:
            a = gguf.quants.quantize(a, quant[name])
            w.add_tensor(name, a, raw_dtype=quant[name])
        else:
            w.add_tensor(name, a)
        written[name] = a
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def _tiny_llama(vocab: int, *, tied: bool = True):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, vocab_size=vocab,
                                   max_position_embeddings=256, rope_theta=50000.0, rms_norm_eps=1e-6,
                                   tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a swapped norm shows
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _assert_state_dict_equal(ours: dict, theirs: dict, tied: bool) -> None:
    expected = {k: v for k, v in theirs.items() if not (tied and k == "lm_head.weight")}
    assert set(ours) == set(expected), (set(ours) ^ set(expected))
    for k, v in expected.items():
        assert ours[k].dtype == torch.float32 and ours[k].shape == v.shape, k
        diff = (ours[k] - v).abs()
        assert torch.equal(ours[k], v), f"{k}: max diff {diff.max():.3g}, mean {diff.mean():.3g}"


def _rebuilt(ckpt, cls):
    """The HF model built from the checkpoint's config dict and state dict alone."""
    model = cls(cls.config_class(**ckpt.config)).eval()
    missing, unexpected = model.load_state_dict(ckpt.state_dict, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if ckpt.config["tie_word_embeddings"] else set())
    return model


def _assert_same_logits(a, b) -> None:
    ids = torch.randint(0, a.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    diff = (la - lb).abs()
    assert diff.max() <= 1e-5, f"logits: max diff {diff.max():.3g}, mean {diff.mean():.3g}"


@pytest.mark.parametrize("pre,tied", [("smollm", True), ("gpt-2", False), ("llama-bpe", True)])
def test_llama_round_trip_f32(tmp_path, pre, tied):
    tok = _byte_level_tokenizer(pre)
    model = _tiny_llama(tok.get_vocab_size(), tied=tied)
    _write_gguf(tmp_path / "m.gguf", model, _byte_level_fields(tok, pre))
    ckpt = read_gguf(tmp_path / "m.gguf")

    _assert_state_dict_equal(ckpt.state_dict, model.state_dict(), tied)
    c = ckpt.config
    assert c["architectures"] == ["LlamaForCausalLM"] and c["tie_word_embeddings"] is tied
    assert (c["num_key_value_heads"], c["head_dim"], c["rope_theta"], c["rms_norm_eps"]) == (2, 16, 50000.0, 1e-6)
    _assert_same_logits(_rebuilt(ckpt, transformers.LlamaForCausalLM), model)

    ours = Tokenizer.from_str(ckpt.tokenizer_json)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for s in SENTENCES:
        assert ours.encode(s).ids == tok.encode(s).ids == hf(s).input_ids, s
        assert ours.decode(ours.encode(s).ids, skip_special_tokens=False) == tok.decode(
            tok.encode(s).ids, skip_special_tokens=False)
    assert ckpt.chat_template == TEMPLATE
    assert ckpt.special_tokens == {"bos_token": "<|im_start|>", "bos_token_id": 1,
                                   "eos_token": "<|im_end|>", "eos_token_id": 2}
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)


def test_qwen2_biases_not_permuted(tmp_path):
    tok = _byte_level_tokenizer("qwen2")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, vocab_size=tok.get_vocab_size(),
                                   max_position_embeddings=256, tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):  # zero-initialized: make them matter
                p.normal_()
    _write_gguf(tmp_path / "q.gguf", model, _byte_level_fields(tok, "qwen2"), arch="qwen2")
    ckpt = read_gguf(tmp_path / "q.gguf")
    _assert_state_dict_equal(ckpt.state_dict, model.state_dict(), tied=False)
    assert ckpt.config["architectures"] == ["Qwen2ForCausalLM"]
    _assert_same_logits(_rebuilt(ckpt, transformers.Qwen2ForCausalLM), model)
    ours = Tokenizer.from_str(ckpt.tokenizer_json)
    for s in SENTENCES + ["\u0065\u0301 composed by NFC"]:
        assert ours.encode(s).ids == tok.encode(s).ids, s


def test_quantized_tensors_are_gguf_dequantized(tmp_path):
    tok = _byte_level_tokenizer("gpt-2")
    model = _tiny_llama(tok.get_vocab_size())
    quant = {"token_embd.weight": Q.Q8_0, "blk.0.attn_q.weight": Q.Q4_1, "blk.1.attn_k.weight": Q.Q8_0,
             "blk.1.ffn_down.weight": Q.Q4_1}
    written = _write_gguf(tmp_path / "m.gguf", model, _byte_level_fields(tok, "gpt-2"), quant=quant)
    sd = read_gguf(tmp_path / "m.gguf").state_dict
    c = model.config

    def expected(name, heads=None):
        w = gguf.quants.dequantize(written[name], quant[name])
        if heads:  # undo llama.cpp's permute by hand: (H, D/2, 2, in) -> (H, 2, D/2, in)
            w = w.reshape(heads, -1, 2, w.shape[-1]).swapaxes(1, 2).reshape(w.shape)
        return torch.from_numpy(np.ascontiguousarray(w))

    for hf, name, heads in [("model.embed_tokens.weight", "token_embd.weight", None),
                            ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", c.num_attention_heads),
                            ("model.layers.1.self_attn.k_proj.weight", "blk.1.attn_k.weight", c.num_key_value_heads),
                            ("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight", None)]:
        want = expected(name, heads)
        assert torch.equal(sd[hf], want), f"{hf}: max diff {(sd[hf] - want).abs().max():.3g}"
        # quantized, yet close to the original (Q4_1 is coarse)
        assert (sd[hf] - model.state_dict()[hf]).abs().max() < 0.25 * model.state_dict()[hf].abs().max()
    k0 = "model.layers.0.self_attn.k_proj.weight"  # left F32: still exact
    assert torch.equal(sd[k0], model.state_dict()[k0])


def test_sentencepiece_vocab_matches_transformers(tmp_path):
    fields = _sentencepiece_fields()
    model = _tiny_llama(len(fields["tokenizer.ggml.tokens"]))
    _write_gguf(tmp_path / "spm.gguf", model, fields)
    ckpt = read_gguf(tmp_path / "spm.gguf")
    ours = Tokenizer.from_str(ckpt.tokenizer_json)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    assert ckpt.add_bos_token  # llama.cpp's default for SentencePiece: no add_bos_token key here
    for s in SENTENCES + ["Ωμέγα falls back to bytes", "<s> inside </s> text"]:
        ids = ours.encode(s).ids
        assert ids == hf(s).input_ids, s
        assert ids[0] == 1
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), s


@pytest.mark.parametrize("change,message", [
    ({"arch": "falcon"}, "architecture 'falcon' is not supported"),
    ({"drop": ("llama.feed_forward_length",)}, "'llama.feed_forward_length'"),
    ({"fields": {"tokenizer.ggml.pre": "deepseek-coder"}}, "tokenizer.ggml.pre='deepseek-coder'"),
    ({"fields": {"tokenizer.ggml.model": "t5"}}, "tokenizer.ggml.model='t5'"),
    ({"fields": {"llama.expert_count": 8}}, "mixture-of-experts"),
    ({"fields": {"llama.rope.dimension_count": 8}}, "partial rotary"),
])
def test_unsupported_files_name_what_is_wrong(tmp_path, change, message):
    tok = _byte_level_tokenizer("gpt-2")
    model = _tiny_llama(tok.get_vocab_size())
    fields = {**_byte_level_fields(tok, "gpt-2"), **change.get("fields", {})}
    arch = change.get("arch", "llama")
    if arch != "llama":
        w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), arch)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
    else:
        _write_gguf(tmp_path / "x.gguf", model, fields, drop=change.get("drop", ()))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_gguf(tmp_path / "x.gguf")


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_gguf("/nonexistent/model.gguf")


PROSE = """Landmark attention splits a long document into blocks and lets each query choose which
blocks to attend to. It's cheap: we don't keep every key in fast memory, only the ones we'll need.
In 2023, researchers showed 32,768-token contexts on a 7B model -- at 3.5x less memory!"""
CODE = '''def grouped_softmax(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) x (B, H, S, D) -> (B, H, T, S)"""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # scaled
    return scores.softmax(dim=-1)\n\n\tif x != 0x1F: print(f"{x=}")  '''
UNICODE = ("Café naïve résumé — «quotes», 日本語のテキスト, 中文, 한국어, العربية, Ελληνικά, "
           "emoji 🤖🎉👩‍💻, \u00a0nbsp, e\u0301")


@pytest.mark.skipif(not REAL.is_file(), reason=f"{REAL} not present (make model)")
def test_real_smollm2_matches_transformers():
    t0 = time.perf_counter()
    ckpt = read_gguf(REAL)
    print(f"read_gguf({REAL.name}): {time.perf_counter() - t0:.2f} s")
    assert ckpt.config["num_hidden_layers"] == 30 and ckpt.config["vocab_size"] == 49152
    assert ckpt.config["tie_word_embeddings"] and "lm_head.weight" not in ckpt.state_dict

    d, name = str(REAL.parent), REAL.name
    transformers.utils.logging.disable_progress_bar()
    try:  # from_pretrained needs accelerate for GGUF; without it, the loader it calls for llama
        import accelerate  # noqa: F401
        model = transformers.LlamaForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
        theirs, their_config = model.state_dict(), model.config.to_dict()
    except ImportError:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        with torch.device("meta"):  # only its parameter names are used, to map the file's tensors
            shell = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ckpt.config))
        parsed = load_gguf_checkpoint(str(REAL), return_tensors=True, model_to_load=shell)
        theirs, their_config = parsed["tensors"], parsed["config"]
        theirs["lm_head.weight"] = theirs["model.embed_tokens.weight"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert ckpt.config[key] == their_config[key], key
    assert ckpt.config["rms_norm_eps"] == pytest.approx(their_config["rms_norm_eps"], rel=1e-6)
    _assert_state_dict_equal(ckpt.state_dict, theirs, tied=True)

    ours = Tokenizer.from_str(ckpt.tokenizer_json)
    hf = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    chat = hf.apply_chat_template([{"role": "user", "content": PROSE}], tokenize=False, add_generation_prompt=True)
    assert ckpt.chat_template == hf.chat_template
    for text in (PROSE, CODE, UNICODE, chat, "  leading spaces and trailing  \n"):
        ids = ours.encode(text).ids
        assert ids == hf(text).input_ids, text[:40]
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ckpt.special_tokens["eos_token"] == hf.eos_token == "<|im_end|>"
    assert ckpt.tokenizer_config()["add_bos_token"] is False
