"""Pretrained checkpoints in and out: Hugging Face Llama-family directories and GGUF files.

`import_checkpoint(src)` reads a Hugging Face directory (config.json, model.safetensors or
sharded safetensors with its index, tokenizer.json, tokenizer_config.json) or a GGUF file
(`engine.gguf_import`) and returns a Folio model in plain causal mode plus the checkpoint's
own tokenizer, with Folio's landmark token appended as one new id (a new embedding row,
and LM-head row when untied, set to the mean of the existing rows). With the landmark
unused, the logits over the original ids are the checkpoint's own (tests compare them with
transformers). `save_imported` writes a Folio model directory; `export_hf` writes a
Hugging Face directory that transformers loads.

Supported: LlamaForCausalLM (Llama 2 / 3.x with rope_scaling 'llama3' or 'linear',
TinyLlama, SmolLM2), MistralForCausalLM without a sliding window, Qwen2ForCausalLM (its QKV
bias) without a sliding window. Anything else names the field that is not supported.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import build_model, read_tensors, save_model, write_tensors
from engine.config import ModelConfig
from engine.errors import CheckpointError, UnsupportedCheckpointError
from engine.model import LandmarkTransformer
from engine.tokenizer import TOKENIZER_CONFIG, TOKENIZER_FILE, HFTokenizer

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
DEFAULT_BLOCK_LEN = 64

# Hugging Face parameter name (per layer: with {i}) -> Folio's
_LAYER_NAMES = {
    "self_attn.q_proj": "attn.wq", "self_attn.k_proj": "attn.wk", "self_attn.v_proj": "attn.wv",
    "self_attn.o_proj": "attn.wo", "mlp.gate_proj": "ffn.w_gate", "mlp.up_proj": "ffn.w_up",
    "mlp.down_proj": "ffn.w_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
_TOP_NAMES = {"model.embed_tokens.weight": "tok_emb.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "lm_head.weight"}


def _unsupported(field: str, value: Any, allowed: str) -> None:
    raise UnsupportedCheckpointError(f"checkpoint config {field}={value!r} is not supported: {allowed}")


def config_from_hf(hf: dict[str, Any], *, block_len: int = DEFAULT_BLOCK_LEN, source: str = "") -> ModelConfig:
    """A Hugging Face config.json dict -> Folio's ModelConfig (causal attention; the vocab
    has one more row, the landmark). Raises UnsupportedCheckpointError naming the field."""
    arch = (hf.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        _unsupported("architectures", hf.get("architectures"), f"one of {ARCHITECTURES}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        _unsupported("hidden_act", act, "'silu' (SwiGLU)")
    if hf.get("mlp_bias"):
        _unsupported("mlp_bias", hf["mlp_bias"], "false")
    if arch != "LlamaForCausalLM":
        window = hf.get("sliding_window")
        if window is not None and hf.get("use_sliding_window", arch == "MistralForCausalLM"):
            _unsupported("sliding_window", window, "null (Folio attends over the whole window)")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(hf.get(key), int):
            _unsupported(key, hf.get(key), "an int (required)")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d // heads
    if head_dim * heads != d:
        _unsupported("head_dim", hf.get("head_dim"), f"hidden_size / num_attention_heads = {d // heads}")
    rope_params = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling")
    if scaling is None and rope_params.get("rope_type", "default") != "default":
        scaling = rope_params
    if isinstance(scaling, dict):
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in (None, "default", "llama3", "linear"):
            _unsupported("rope_scaling.rope_type", kind, "default, llama3 or linear")
        if kind in (None, "default"):
            scaling = None
        else:
            scaling = {k: scaling[k] for k in ("rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
                                               "original_max_position_embeddings") if k in scaling}
            scaling.setdefault("rope_type", scaling.pop("type", kind))
            scaling.pop("type", None)
    bias = bool(hf.get("attention_bias", False))
    qwen = arch == "Qwen2ForCausalLM"
    return ModelConfig(
        vocab_size=hf["vocab_size"] + 1, d_model=d, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads, ffn_hidden=hf["intermediate_size"],
        max_seq_len=int(hf.get("max_position_embeddings", 2048)), block_len=block_len,
        rope_theta=float(theta), norm_eps=float(hf.get("rms_norm_eps", 1e-6)), attention="causal",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dtype="float32",
        rope_scaling=scaling, qkv_bias=bias or qwen, o_bias=bias and not qwen, source=source)


def hf_config_from(cfg: ModelConfig, *, bos_id: int | None = None, eos_id: int | None = None) -> dict[str, Any]:
    """Folio's ModelConfig -> a Llama (Qwen2 when it has only the QKV bias) config.json dict,
    landmark row included in the vocab."""
    qwen = cfg.qkv_bias and not cfg.o_bias
    out: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling, "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu", "torch_dtype": cfg.dtype, "bos_token_id": bos_id, "eos_token_id": eos_id,
    }
    if not qwen:
        out.update(attention_bias=cfg.o_bias, mlp_bias=False)
    return out


def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF-named tensors -> Folio's state dict (float32), with the landmark row appended to the
    embedding (and to the LM head when untied): the mean of the existing rows."""
    out: dict[str, torch.Tensor] = {}
    for name, t in hf_state.items():
        if name in _TOP_NAMES:
            out[_TOP_NAMES[name]] = t
            continue
        parts = name.split(".")
        if parts[:2] != ["model", "layers"] or len(parts) < 5:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer some checkpoints carry; recomputed from the config
            raise UnsupportedCheckpointError(f"checkpoint tensor {name!r} is not a Llama-family parameter")
        i, inner, leaf = parts[2], ".".join(parts[3:-1]), parts[-1]
        if inner not in _LAYER_NAMES:
            raise UnsupportedCheckpointError(f"checkpoint tensor {name!r} is not a Llama-family parameter")
        out[f"layers.{i}.{_LAYER_NAMES[inner]}.{leaf}"] = t
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    elif "lm_head.weight" not in out:
        raise CheckpointError("checkpoint has no lm_head.weight but tie_word_embeddings is false")
    out = {k: v.to(torch.float32) for k, v in out.items()}
    for key in ("tok_emb.weight",) + (() if cfg.tie_embeddings else ("lm_head.weight",)):
        w = out[key]
        if w.shape[0] != cfg.vocab_size - 1:
            raise CheckpointError(f"{key} has {w.shape[0]} rows, config vocab_size {cfg.vocab_size - 1}")
        out[key] = torch.cat([w, w.mean(0, keepdim=True)])  # the landmark's row
    return out


def hf_state_from(model: LandmarkTransformer) -> dict[str, torch.Tensor]:
    """Folio's parameters -> HF names (landmark row kept: the exported vocab includes it)."""
    inverse_top = {v: k for k, v in _TOP_NAMES.items()}
    inverse_layer = {v: k for k, v in _LAYER_NAMES.items()}
    out = {}
    for name, t in model.state_dict().items():
        if model.cfg.tie_embeddings and name == "lm_head.weight":
            continue
        if name in inverse_top:
            out[inverse_top[name]] = t
            continue
        _, i, *inner, leaf = name.split(".")
        out[f"model.layers.{i}.{inverse_layer['.'.join(inner)]}.{leaf}"] = t
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def _read_safetensors(d: Path) -> dict[str, torch.Tensor]:
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    if single.is_file():
        return read_tensors(single)[0]
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for f in files:
            if not (d / f).is_file():
                raise CheckpointError(f"{d}: the index names {f}, which is missing")
            state.update(read_tensors(d / f)[0])
        return state
    if any(d.glob("*.bin")) or any(d.glob("*.pt")):
        raise UnsupportedCheckpointError(f"{d}: only pickle weights (*.bin/*.pt); Folio never unpickles: "
                                         f"convert them to safetensors first")
    raise CheckpointError(f"{d}: no model.safetensors or model.safetensors.index.json")


def _weights_source(name: str, state: dict[str, torch.Tensor]) -> str:
    """A short identity of imported weights: the name and a hash of a few tensors' bytes
    (cheap, and enough to tell two checkpoints of the same shape apart)."""
    h = hashlib.sha256()
    for key in sorted(state)[:4] + sorted(state)[-4:]:
        t = state[key].detach().to(torch.float32).contiguous()
        h.update(key.encode())
        h.update(t.reshape(-1)[:4096].numpy().tobytes())
    return f"{name}#{h.hexdigest()[:12]}"


def is_hf_directory(path: str | os.PathLike) -> bool:
    """Whether `path` is a Hugging Face checkpoint directory (a config.json with
    architectures or model_type, not a Folio export)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        d = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(d, dict) and "model" not in d and ("architectures" in d or "model_type" in d)


def import_checkpoint(src: str | os.PathLike, *, block_len: int = DEFAULT_BLOCK_LEN
                      ) -> tuple[LandmarkTransformer, HFTokenizer]:
    """A Hugging Face directory or a .gguf file -> (Folio model, its tokenizer).

    Raises CheckpointError (missing or inconsistent files) or UnsupportedCheckpointError
    (an architecture or field Folio does not implement, named)."""
    p = Path(src)
    if p.is_file() and p.suffix == ".gguf":
        from engine.gguf_import import read_gguf

        ck = read_gguf(p)
        hf_cfg, hf_state = ck.config, ck.state_dict
        tok_json = ck.tokenizer_json
        tok_cfg = {"chat_template": ck.chat_template, **_special_strings(ck.special_tokens)}
    elif p.is_dir():
        if not (p / "config.json").is_file():
            raise CheckpointError(f"{p}: no config.json (expected a Hugging Face checkpoint directory)")
        hf_cfg = json.loads((p / "config.json").read_text())
        if not (p / TOKENIZER_FILE).is_file():
            raise CheckpointError(f"{p}: no {TOKENIZER_FILE} (Folio uses the checkpoint's own tokenizer)")
        tok_json = (p / TOKENIZER_FILE).read_text(encoding="utf-8")
        tok_cfg = json.loads((p / TOKENIZER_CONFIG).read_text()) if (p / TOKENIZER_CONFIG).is_file() else {}
        if not tok_cfg.get("chat_template") and (p / "chat_template.jinja").is_file():
            tok_cfg["chat_template"] = (p / "chat_template.jinja").read_text(encoding="utf-8")
        tok_cfg = {k: v for k, v in tok_cfg.items() if k != "added_tokens_decoder"}
        hf_state = _read_safetensors(p)
    else:
        raise CheckpointError(f"{src}: not a Hugging Face checkpoint directory or a .gguf file")
    cfg = config_from_hf(hf_cfg, block_len=block_len, source=_weights_source(p.name, hf_state))
    model = build_model(cfg, state_from_hf(hf_state, cfg), "checkpoint does not match its config")
    tok = HFTokenizer(tok_json, model_vocab=cfg.vocab_size - 1, config=tok_cfg)
    return model, tok


def _special_strings(special: dict) -> dict[str, str]:
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        v = special.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            out[key] = v
    return out


def save_imported(model: LandmarkTransformer, tokenizer: HFTokenizer, out: str | os.PathLike) -> Path:
    """A Folio model directory: model.safetensors + config.json + tokenizer files."""
    d = save_model(model, out)
    tokenizer.save(d)
    return d


def export_hf(model: LandmarkTransformer, tokenizer: HFTokenizer, out: str | os.PathLike) -> Path:
    """A Hugging Face directory (config.json, model.safetensors, tokenizer files) that
    transformers loads; the landmark token is in its vocab and tokenizer."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    write_tensors(d / "model.safetensors", hf_state_from(model), {"format": "pt"})
    hf = hf_config_from(model.cfg, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    (d / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    tokenizer.save(d, defaults={"tokenizer_class": "PreTrainedTokenizerFast"})
    return d
