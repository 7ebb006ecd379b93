"""GGUF import: one llama.cpp GGUF file -> what a Hugging Face checkpoint directory gives.

`read_gguf(path)` returns a `GGUFCheckpoint`: an HF-style `config.json` dict, a float32
state dict under HF parameter names, a `tokenizer.json` (text, for the `tokenizers`
library), the chat template and the special tokens. Nothing here imports transformers
and nothing is unpickled: the file is parsed by `gguf.GGUFReader` (a memory map) and its
quantized blocks are expanded by `gguf.quants.dequantize`.

Architectures (`general.architecture`):
- `llama`: Llama 1/2/3, SmolLM, TinyLlama, and the dense Mistral models (7B, Nemo), which
  llama.cpp also writes as `llama`; they load as `LlamaForCausalLM` (a sliding window is
  not stored in GGUF, so Mistral 7B v0.1's 4096-token window is lost). llama.cpp permutes
  the Q and K rows for its RoPE layout; this undoes it. Not supported, with a ValueError:
  mixture-of-experts files (`llama.expert_count`, Mixtral), a `rope_freqs` tensor (Llama
  3.1-style frequency scaling: the factors cannot be turned back into HF's parameters), and
  partial rotary (`rope.dimension_count` != head_dim). `mistral3` is a different
  architecture and is rejected.
- `qwen2`: the same tensors plus the Q/K/V biases; llama.cpp does not permute Qwen2 (it uses
  NeoX-style RoPE, as HF does); loads as `Qwen2ForCausalLM`.

Tokenizers (`tokenizer.ggml.model`):
- `gpt2`: byte-level BPE from the file's tokens and merges, with the pre-tokenizer the
  `tokenizer.ggml.pre` type names (table `_PRE_TOKENIZERS`; an unlisted type is a
  ValueError, since guessing it would silently give other ids).
- `llama`: SentencePiece BPE with byte fallback, as transformers' `LlamaTokenizer` builds it
  (`Metaspace`, prefix space on the first piece only); merges from the file or, as usual,
  derived from the token scores.
Tokens typed CONTROL or UNKNOWN become special added tokens, USER_DEFINED ones plain added
tokens (matched whole, as llama.cpp does). BOS/EOS are added by the post-processor when
`tokenizer.ggml.add_bos_token` / `add_eos_token` say so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors


@dataclass(kw_only=True)
class GGUFCheckpoint:
    """Everything a HF checkpoint directory would hold, read from one GGUF file."""

    config: dict
    """`config.json` fields: architectures, model_type, sizes, rope_theta, rope_scaling, ..."""
    state_dict: dict[str, torch.Tensor]
    """float32, HF names; no `lm_head.weight` when `config["tie_word_embeddings"]`."""
    tokenizer_json: str
    """A `tokenizers` tokenizer.json, giving the ids HF's tokenizer gives."""
    chat_template: str | None
    """The Jinja chat template, or None when the file has none."""
    special_tokens: dict
    """`bos_token`, `bos_token_id`, and likewise eos/pad/unk: those the file names."""
    add_bos_token: bool = False
    """Whether encoding adds BOS (the tokenizer.json's post-processor already does it)."""
    add_eos_token: bool = False

    def tokenizer_config(self) -> dict:
        """The fields of HF's `tokenizer_config.json`: special token strings, chat_template,
        add_bos_token, add_eos_token."""
        out = {k: v for k, v in self.special_tokens.items() if not k.endswith("_id")}
        out.update(add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token)
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        return out


@dataclass(frozen=True)
class _Arch:
    hf_class: str
    model_type: str
    permuted_qk: bool  # llama.cpp reorders Q/K rows for ggml's interleaved RoPE


_ARCHS = {
    "llama": _Arch("LlamaForCausalLM", "llama", permuted_qk=True),
    "qwen2": _Arch("Qwen2ForCausalLM", "qwen2", permuted_qk=False),
}

# GGUF leaf name -> HF module path, inside `blk.N.` / `model.layers.N.`
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# token types, as llama.cpp numbers them (gguf.TokenType)
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class _Pre:
    """How the HF tokenizer.json of one `tokenizer.ggml.pre` family splits text."""

    split: str | None  # regex applied before ByteLevel; None: ByteLevel's own (GPT-2) regex
    digits: bool = False  # each digit its own piece first (StarCoder / SmolLM)
    nfc: bool = False  # Qwen2's tokenizer.json normalizes to NFC
    ignore_merges: bool = False  # a whole piece in the vocab is taken as is (Llama 3)
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token


_PRE_TOKENIZERS = {
    **dict.fromkeys(("gpt-2", "mpt", "olmo", "jais"), _Pre(None)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b"), _Pre(None, digits=True)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe"),
                    _Pre(_LLAMA3_SPLIT, ignore_merges=True, add_bos=True)),
    **dict.fromkeys(("falcon3", "dbrx", "smaug-bpe"), _Pre(_LLAMA3_SPLIT)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"), _Pre(_QWEN2_SPLIT, nfc=True)),
}


class _Metadata:
    """The file's key/value fields, with errors that name the missing key."""

    def __init__(self, reader: gguf.GGUFReader, path: str):
        self.fields = reader.fields
        self.path = path

    def get(self, key: str, default=None):
        f = self.fields.get(key)
        return default if f is None else f.contents()

    def require(self, key: str):
        f = self.fields.get(key)
        if f is None:
            raise ValueError(f"{self.path}: GGUF metadata has no {key!r}, which is required")
        return f.contents()


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Read a Llama/Qwen2 GGUF file into HF form: see the module docstring for what is
    supported. Raises FileNotFoundError for a missing file and ValueError naming the
    architecture, tokenizer model, tensor or metadata key it cannot convert."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    reader = gguf.GGUFReader(path)
    meta = _Metadata(reader, path)
    arch_name = meta.require("general.architecture")
    if arch_name not in _ARCHS:
        raise ValueError(f"{path}: GGUF architecture {arch_name!r} is not supported; "
                         f"allowed: {sorted(_ARCHS)}")
    arch = _ARCHS[arch_name]
    tensors = {t.name: t for t in reader.tensors}
    config = _config(meta, arch_name, arch, tensors)
    tokenizer, special, add_bos, add_eos = _tokenizer(meta)  # before the slow part: fail fast
    state_dict = _state_dict(tensors, arch, config, path)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config[key] = special.get(key)
    return GGUFCheckpoint(config=config, state_dict=state_dict, tokenizer_json=tokenizer.to_str(),
                          chat_template=meta.get("tokenizer.chat_template"), special_tokens=special,
                          add_bos_token=add_bos, add_eos_token=add_eos)


def _f32(x: float) -> float:
    # GGUF stores float32: 9.999999747e-06 is the config's 1e-05, so keep the shortest spelling
    return float(str(np.float32(x)))


def _config(meta: _Metadata, prefix: str, arch: _Arch, tensors: dict) -> dict:
    """The HF config.json dict from `{prefix}.*` metadata and which tensors exist."""
    def req(key):
        return meta.require(f"{prefix}.{key}")

    if meta.get(f"{prefix}.expert_count", 0):
        raise ValueError(f"{meta.path}: {prefix}.expert_count={meta.get(f'{prefix}.expert_count')}: "
                         f"mixture-of-experts GGUF files are not supported, only dense models")
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{meta.path}: has a rope_freqs tensor (Llama 3.1-style RoPE frequency "
                         f"scaling), which cannot be converted to an HF rope_scaling; not supported")
    hidden, n_heads = int(req("embedding_length")), int(req("attention.head_count"))
    n_kv = int(meta.get(f"{prefix}.attention.head_count_kv", n_heads))
    head_dim = int(meta.get(f"{prefix}.attention.key_length", hidden // n_heads))
    rope_dim = int(meta.get(f"{prefix}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"{meta.path}: {prefix}.rope.dimension_count={rope_dim} differs from "
                         f"head_dim={head_dim}; partial rotary embeddings are not supported")
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{meta.path}: no token_embd.weight tensor")
    vocab = int(meta.get(f"{prefix}.vocab_size", tensors["token_embd.weight"].shape[1]))
    config = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "intermediate_size": int(req("feed_forward_length")),
        "num_hidden_layers": int(req("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(req("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta.get(f"{prefix}.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta, prefix),
        "max_position_embeddings": int(req("context_length")),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
    }
    if arch.model_type == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None)
    return config


def _rope_scaling(meta: _Metadata, prefix: str) -> dict | None:
    kind = meta.get(f"{prefix}.rope.scaling.type")
    factor = meta.get(f"{prefix}.rope.scaling.factor")
    if kind is None and meta.get(f"{prefix}.rope.scale_linear") is not None:  # older files
        kind, factor = "linear", meta.get(f"{prefix}.rope.scale_linear")
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind == "yarn":
        original = meta.require(f"{prefix}.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": _f32(factor),
                "original_max_position_embeddings": int(original)}
    raise ValueError(f"{meta.path}: {prefix}.rope.scaling.type={kind!r} is not supported; "
                     f"allowed: none, linear, yarn")


def _hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if unknown."""
    stem, _, kind = gguf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{kind}"
    return None


def _undo_rope_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's rotate_half pairs dim i with i + D/2 in each head; ggml's RoPE pairs 2i with 2i+1,
    so llama.cpp's converter moved row (h, half, i) to (h, i, half). Move it back.

    w: (n_heads * D, in) or a bias (n_heads * D,). Returns the same shape.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows cannot be split into {n_heads} heads of even size")
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])  # (H, D/2, 2, ...) as stored
             .transpose(1, 2)  # (H, 2, D/2, ...): first halves, then second halves
             .reshape(w.shape))


def _state_dict(tensors: dict, arch: _Arch, config: dict, path: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        hf = _hf_name(name)
        if hf is None:
            raise ValueError(f"{path}: tensor {name!r} has no Hugging Face counterpart for "
                             f"{config['architectures'][0]}; not supported")
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists the fastest dim first
        try:
            # a plain ndarray view of the map: numpy's memmap subclass costs a Python call per
            # row slice, which doubles the dequantization time
            values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"{path}: tensor {name!r} has ggml type {t.tensor_type.name}, "
                             f"which gguf cannot dequantize: {e}") from None
        if np.may_share_memory(values, t.data):  # F32 comes back as a view of the read-only map
            values = values.copy()
        w = torch.from_numpy(values.astype(np.float32, copy=False)).reshape(shape)
        if arch.permuted_qk and ".attn_q." in name:
            w = _undo_rope_permute(w, config["num_attention_heads"])
        elif arch.permuted_qk and ".attn_k." in name:
            w = _undo_rope_permute(w, config["num_key_value_heads"])
        out[hf] = w.contiguous()
    _check_complete(out, config, path)
    return out


def _check_complete(sd: dict[str, torch.Tensor], config: dict, path: str) -> None:
    """Every parameter the HF model has is present, with the shape the config implies."""
    h, f, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    want = {"model.embed_tokens.weight": (config["vocab_size"], h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        want["lm_head.weight"] = (config["vocab_size"], h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        want.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                     p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                     p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                     p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                     p + "mlp.down_proj.weight": (h, f)})
        if config["model_type"] == "qwen2" or config["attention_bias"]:
            want.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                         p + "self_attn.v_proj.bias": (kv,)})
        if config["model_type"] == "llama" and config["attention_bias"]:  # HF biases all four or none
            want[p + "self_attn.o_proj.bias"] = (h,)
        if config["mlp_bias"]:
            want.update({p + "mlp.gate_proj.bias": (f,), p + "mlp.up_proj.bias": (f,),
                         p + "mlp.down_proj.bias": (h,)})
    missing = sorted(set(want) - set(sd))
    if missing:
        raise ValueError(f"{path}: tensors missing for {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape:
            raise ValueError(f"{path}: {k} has shape {tuple(sd[k].shape)}, the config implies {shape}")


def _tokenizer(meta: _Metadata) -> tuple[Tokenizer, dict, bool, bool]:
    """The tokenizers-library Tokenizer, the special tokens dict, add_bos, add_eos."""
    kind = meta.require("tokenizer.ggml.model")
    tokens = list(meta.require("tokenizer.ggml.tokens"))
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"{meta.path}: {len(tokens)} tokens but {len(types)} token types")
    special = {}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("unk", "unknown_token_id"), ("pad", "padding_token_id")):
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None and 0 <= int(i) < len(tokens):
            special[f"{name}_token"], special[f"{name}_token_id"] = tokens[int(i)], int(i)
    # a string listed twice keeps its first id (a dict, like HF's vocab); the later id stays unused
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if kind == "gpt2":
        pre_name = meta.require("tokenizer.ggml.pre")
        if pre_name not in _PRE_TOKENIZERS:
            raise ValueError(f"{meta.path}: tokenizer.ggml.pre={pre_name!r} is not supported; "
                             f"allowed: {sorted(_PRE_TOKENIZERS)}")
        pre = _PRE_TOKENIZERS[pre_name]
        tok = _byte_level_bpe(vocab, _merges(meta), pre)
        add_bos_default = pre.add_bos
    elif kind == "llama":
        merges = (_merges(meta) if meta.get("tokenizer.ggml.merges") is not None
                  else _merges_from_scores(tokens, meta.require("tokenizer.ggml.scores")))
        tok = _sentencepiece_bpe(vocab, merges, special.get("unk_token"),
                                 bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
        add_bos_default = True  # llama.cpp's and HF's default for a SentencePiece vocabulary
    else:
        raise ValueError(f"{meta.path}: tokenizer.ggml.model={kind!r} is not supported; "
                         f"allowed: 'gpt2' (byte-level BPE), 'llama' (SentencePiece BPE)")

    named = {special[k] for k in special if not k.endswith("_id")}
    added = [AddedToken(t, special=ty in (_CONTROL, _UNKNOWN) or t in named, normalized=False)
             for i, (t, ty) in enumerate(zip(tokens, types))
             if vocab[t] == i and (ty in (_CONTROL, _UNKNOWN, _USER_DEFINED) or t in named)]
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and "bos_token" in special
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and "eos_token" in special
    tok.post_processor = _post_processor(special, add_bos, add_eos, byte_level=kind == "gpt2")
    return tok, special, add_bos, add_eos


def _merges(meta: _Metadata) -> list[tuple[str, str]]:
    out = []
    for m in meta.require("tokenizer.ggml.merges"):
        cut = m.find(" ", 1)  # as llama.cpp reads them: a piece may itself start with a space
        if cut < 0:
            raise ValueError(f"{meta.path}: merge {m!r} is not two space-separated tokens")
        out.append((m[:cut], m[cut + 1:]))
    return out


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE keeps scores, not merges: every split of a token into two tokens is a
    merge, ranked by the merged token's score (higher first), then by longer left and right
    pieces, then by the pieces' ids -- the order transformers derives."""
    if len(scores) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(scores)} scores")
    ids = {}
    for i, t in enumerate(tokens):
        ids.setdefault(t, i)
    ranked = []
    for t, score in zip(tokens, scores):
        splits = [(t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in ids and t[k:] in ids]
        splits.sort(key=lambda lr: (ids[lr[0]], ids[lr[1]]))
        ranked.extend((-float(score), -len(l), -len(r), l, r) for l, r in splits)
    ranked.sort(key=lambda e: e[:3])  # stable: ties keep the id order above
    return [(l, r) for *_, l, r in ranked]


def _byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], pre: _Pre) -> Tokenizer:
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                               byte_fallback=False, ignore_merges=pre.ignore_merges))
    if pre.nfc:
        tok.normalizer = normalizers.NFC()
    steps = []
    if pre.digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if pre.split is not None:
        steps.append(pre_tokenizers.Split(Regex(pre.split), behavior="isolated", invert=False))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                          use_regex=pre.split is None))
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], unk: str | None,
                       add_space_prefix: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    # "first": the prefix space goes on the text's first piece only, not after each special token
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_space_prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _post_processor(special: dict, add_bos: bool, add_eos: bool, *, byte_level: bool):
    if not (add_bos or add_eos):
        return processors.ByteLevel(trim_offsets=False) if byte_level else None
    bos = f"{special['bos_token']}:0 " if add_bos else ""
    eos = f" {special['eos_token']}:0" if add_eos else ""
    single = f"{bos}$A:0{eos}"
    pair = f"{single} {bos.replace(':0', ':1')}$B:1{eos.replace(':0', ':1')}"
    used = ([(special["bos_token"], special["bos_token_id"])] if add_bos else []) + \
           ([(special["eos_token"], special["eos_token_id"])] if add_eos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=sorted(set(used)))
