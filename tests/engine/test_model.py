"""The model: configs, tokenizer, landmark layout, KV-cache decoding, bad input."""

import pytest
import torch

from engine.attention import max_abs_diff
from engine.config import PRESETS, ModelConfig, preset
from engine.landmarks import IGNORE_INDEX, insert_landmarks, landmark_positions, next_token_targets
from engine.model import LandmarkTransformer
from engine.tokenizer import ByteTokenizer


def _tiny(**kw):
    return preset("tiny", block_len=8, max_seq_len=64, **kw)


def test_presets_and_param_counts():
    assert set(PRESETS) >= {"tiny", "small", "llama-1b", "llama-7b"}
    small = preset("small")
    assert 20e6 <= small.num_params() <= 30e6
    m = LandmarkTransformer(preset("tiny"))
    assert m.num_params() == preset("tiny").num_params()
    assert 1.0e9 < preset("llama-1b").num_params() < 1.5e9
    assert 6.5e9 < preset("llama-7b").num_params() < 7.0e9


@pytest.mark.parametrize("field,value,msg", [
    ("n_kv_heads", 3, "n_kv_heads"), ("block_len", 1, "block_len"), ("attention", "x", "attention"),
    ("d_model", 130, "d_model"), ("dtype", "int8", "dtype"), ("vocab_size", 0, "vocab_size"),
])
def test_config_validation_names_field(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        ModelConfig(**{**PRESETS["tiny"], field: value})


def test_choice_fields_are_literals_checked_at_run_time():
    import typing

    from engine import config

    hints = typing.get_type_hints(ModelConfig, vars(config))
    for name, allowed in (("attention", config.ATTENTION_MODES), ("dtype", config.DTYPES)):
        assert typing.get_args(hints[name]) == allowed
        with pytest.raises(ValueError, match=f"{name}='nope' is invalid"):
            ModelConfig(**{**PRESETS["tiny"], name: "nope"})
    rope = typing.get_type_hints(config.RopeScaling, vars(config))["rope_type"]
    assert typing.get_args(rope) == config.ROPE_SCALING_TYPES == ("llama3", "linear")


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset='huge' does not exist"):
        preset("huge")


def test_tokenizer_roundtrip():
    tok = ByteTokenizer()
    s = "héllo, wörld ✓"
    ids = tok.encode(s, bos=True, eos=True)
    assert ids[0] == tok.BOS and ids[-1] == tok.EOS
    assert tok.decode(ids) == s
    assert tok.decode(ids, keep_special=True).startswith("<bos>")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([300])


def test_insert_landmarks_layout_and_pieces():
    L = 4
    out = insert_landmarks(list(range(10)), L, 99)
    assert out.tolist() == [0, 1, 2, 99, 3, 4, 5, 99, 6, 7, 8, 99, 9]
    assert torch.equal(landmark_positions(len(out), L), out == 99)
    a = insert_landmarks(list(range(4)), L, 99)
    b = insert_landmarks(list(range(4, 10)), L, 99, offset=1)
    assert torch.cat([a, b]).tolist() == out.tolist()


def test_targets_ignore_landmarks():
    toks = torch.tensor([[1, 2, 99, 3, 256]])
    assert next_token_targets(toks, 99, 256).tolist() == [[2, IGNORE_INDEX, 3, IGNORE_INDEX, IGNORE_INDEX]]


@pytest.mark.parametrize("attention", ["landmark", "causal"])
def test_kv_cache_decoding_matches_full_forward(attention):
    torch.manual_seed(0)
    m = LandmarkTransformer(_tiny(attention=attention)).eval()
    toks = torch.randint(0, 256, (2, 45))
    with torch.no_grad():
        full = m(toks)
        cache = m.new_cache(2, 64)
        parts = [m(toks[:, :13], cache=cache)]  # a prefill chunk, then one token at a time
        parts += [m(toks[:, t:t + 1], cache=cache) for t in range(13, 45)]
    inc = torch.cat(parts, 1)
    assert max_abs_diff(full, inc) <= 1e-5, max_abs_diff(full, inc)


def test_blockwise_forward_matches_vectorized_and_longer_than_window():
    torch.manual_seed(1)
    m = LandmarkTransformer(_tiny()).eval()
    toks = torch.randint(0, 256, (1, 64))
    with torch.no_grad():
        assert max_abs_diff(m(toks, impl="vectorized"), m(toks, impl="blockwise")) <= 1e-5
        long = torch.randint(0, 256, (1, 200))
        assert m(long, impl="blockwise").shape == (1, 200, 260)


def test_return_kv_gives_pre_rope_keys():
    torch.manual_seed(2)
    m = LandmarkTransformer(_tiny()).eval()
    toks = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        _, kvs = m(toks, return_kv=True)
        x = m.layers[0].attn_norm(m.tok_emb(toks))
        k = m.layers[0].attn.wk(x).view(1, 16, 2, -1).transpose(1, 2)
    assert len(kvs) == 2 and torch.allclose(kvs[0].k, k)


@pytest.mark.parametrize("tokens,msg", [
    (torch.tensor([[1, 2, 260]]), "id 260"),
    (torch.tensor([[-1, 2]]), "id -1"),
    (torch.tensor([[1.0, 2.0]]), "dtype"),
    (torch.tensor([1, 2]), "shape"),
    ([[1, 2]], "torch.Tensor"),
])
def test_bad_tokens(tokens, msg):
    m = LandmarkTransformer(_tiny())
    with pytest.raises(ValueError, match=msg):
        m(tokens)


def test_window_overflow_and_impl_errors():
    m = LandmarkTransformer(_tiny())
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
        m(torch.zeros(1, 65, dtype=torch.long), impl="vectorized")
    with pytest.raises(ValueError, match="impl='nope'"):
        m(torch.zeros(1, 4, dtype=torch.long), impl="nope")
    with pytest.raises(ValueError, match="sdpa"):
        m(torch.zeros(1, 4, dtype=torch.long), impl="sdpa")


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    m = LandmarkTransformer(_tiny())
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    tok = ByteTokenizer()
    toks = insert_landmarks(tok.encode("abcabcabcabc" * 4), 8, tok.LANDMARK)[None, :64]
    tgt = next_token_targets(toks, tok.LANDMARK, tok.PAD)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(m(toks).flatten(0, 1), tgt.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_rope_table_cache_is_bit_identical_to_direct_computation():
    from engine.model import _ROPE_CACHE_MAX, _rope_compute, rope_cos_sin

    cases = (torch.arange(0, 300), torch.tensor([5, 0, _ROPE_CACHE_MAX - 1]),  # cached
             torch.arange(_ROPE_CACHE_MAX - 2, _ROPE_CACHE_MAX + 3), torch.tensor([-1, 4]))  # computed
    for pos in cases:
        for dt in (torch.float32, torch.float64, torch.bfloat16):
            got, want = rope_cos_sin(pos, 32, 10000.0, dt), _rope_compute(pos, 32, 10000.0, dt)
            assert got[0].dtype == dt and got[0].shape == (pos.numel(), 32)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
