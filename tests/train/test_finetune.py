"""Landmark fine-tuning of a 'pretrained' model with LoRA: adapters, merge, export, resume, data.

The pretrained model here is a small random causal model with a real subword tokenizer
(trained by `tokenizers` in the test) and a chat template, saved as `folio import` saves a
checkpoint; the real SmolLM2 run is the `slow` test at the end.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_model
from engine.config import preset
from engine.convert import save_imported
from engine.model import LandmarkTransformer
from engine.tokenizer import HFTokenizer, load_tokenizer
from train.config import TrainConfig, train_preset
from train.data import Document, build_source
from train.finetune import LoraSpec, adapter_state, apply_lora, merge_state, write_adapter
from train.loop import DSOptions, train
from train.windows import tokenize_document, token_weights, window_at

NO_OFFLOAD = DSOptions(offload="none")
TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
            "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["It is a truth universally acknowledged, that a single man in possession of a good fortune,",
          "must be in want of a wife. What is the password? The password is 4821. Tell me the code.",
          "The State of the Union is strong. Congress shall make no law. def main(): return 0"]


def _hf_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 30, trainer)
    return tok.to_str()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A causal 'pretrained' model directory with its own tokenizer and chat template."""
    tj = _hf_tokenizer_json()
    from tokenizers import Tokenizer

    base = Tokenizer.from_str(tj).get_vocab_size()
    tok = HFTokenizer(tj, model_vocab=base, config={"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                                    "chat_template": TEMPLATE})
    torch.manual_seed(0)
    cfg = preset("tiny", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=256,
                 block_len=32, vocab_size=base + 1, attention="causal", tie_embeddings=True)
    model = LandmarkTransformer(cfg)
    return save_imported(model, tok, tmp_path_factory.mktemp("pre") / "base")


def _ft(pre: Path, out: Path, **kw) -> TrainConfig:
    fields = dict(model="init", init_from=str(pre), model_overrides={"attention": "landmark", "max_seq_len": 128},
                  data=("needles:answer_weight=4,max_keys=2",), synthetic_chars=(300, 900), window_len=128,
                  micro_batch=2, max_steps=4, warmup_steps=1, lr=1e-2, save_every=0, retrieval=True,
                  lora_rank=4, out_dir=str(out))
    fields.update(kw)
    return TrainConfig(**fields)


def _landmark_model(vocab: int = 260) -> LandmarkTransformer:
    torch.manual_seed(1)
    return LandmarkTransformer(preset("tiny", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96,
                                      max_seq_len=64, block_len=16, vocab_size=vocab))


# ------------------------------------------------------------------------------- adapters


def test_merged_weights_compute_what_the_adapted_model_computes():
    base = _landmark_model()
    spec = LoraSpec(rank=4, alpha=8.0, targets=("wq", "wv", "w_down"), landmark_id=259)
    adapted = apply_lora(_landmark_model(), spec)
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    with torch.no_grad():  # a trained adapter: B and the landmark row away from their init
        for n, p in adapted.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    state = adapted.state_dict()
    merged = merge_state(state, spec)
    assert set(merged) == set(base.state_dict())
    plain = _landmark_model()
    plain.load_state_dict(merged)
    x = torch.randint(0, 259, (2, 48))
    x[:, 15::16] = 259  # landmarks, so the trained landmark row matters
    with torch.no_grad():
        a, b = adapted(x), plain(x)
    # the landmark's own output logit is the only difference (tied head keeps the old row; never a target)
    assert torch.allclose(a[..., :259], b[..., :259], atol=1e-5), (a - b)[..., :259].abs().max()
    assert not torch.allclose(a[..., :259], base(x)[..., :259], atol=1e-3)  # the adapter does change it
    # the adapter alone: A/B per adapted projection and the landmark row, nothing else
    ad = adapter_state(state, spec)
    assert len(ad) == 2 * 3 * 2 + 1 and "tok_emb.landmark_row" in ad


def test_adapter_directory_loads_as_base_plus_adapter(tmp_path, pretrained):
    from engine.checkpoint import read_model

    cfg0, base_state = read_model(pretrained)
    import dataclasses

    cfg = dataclasses.replace(cfg0, attention="landmark")
    spec = LoraSpec(rank=2, targets=("wq", "wo"), landmark_id=cfg.vocab_size - 1)
    m = LandmarkTransformer(cfg)
    m.load_state_dict(base_state, strict=False)
    m = apply_lora(m, spec)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    d = write_adapter(tmp_path / "ad", m.state_dict(), spec, base=str(pretrained), model_config=cfg.to_dict(),
                      base_fingerprint=cfg0.fingerprint())
    load_tokenizer(pretrained).save(d)
    assert (d / "adapter.safetensors").stat().st_size < 200_000  # the adapter, not the model
    loaded = load_model(d)
    plain = LandmarkTransformer(cfg)
    plain.load_state_dict(merge_state(m.state_dict(), spec), strict=False)
    x = torch.randint(0, cfg.vocab_size - 1, (1, 40))
    with torch.no_grad():
        assert torch.allclose(loaded(x), plain(x), atol=1e-6)
    # a base model of another fingerprint is refused by name
    meta = json.loads((d / "adapter_config.json").read_text())
    meta["base_fingerprint"] = "0000000000000000"
    (d / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="trained on base model 0000000000000000"):
        load_model(d)


def test_lora_spec_errors_name_the_field():
    with pytest.raises(ValueError, match="rank"):
        LoraSpec(rank=0)
    with pytest.raises(ValueError, match="targets"):
        LoraSpec(rank=4, targets=("q_proj",))
    with pytest.raises(ValueError, match="lora"):
        TrainConfig(lora_rank=4, lora_targets=("nope",))


# ------------------------------------------------------------------------------- data


def test_needle_documents_are_chat_turns_of_real_training_prose(pretrained):
    from engine import corpora
    from engine.needle import NEEDLES, WORDS

    tok = load_tokenizer(pretrained)
    src = build_source("needles:answer_weight=8,max_keys=3", seed=0, synthetic_chars=(800, 2000),
                       chat=tok.chat_parts())
    for i in range(12):
        doc = src.document(i)
        assert doc.specials and doc.text.startswith("<|im_start|>user\n")
        for name in doc.name.split(":", 1)[1].rsplit("#", 1)[0].split("+"):
            assert not corpora.is_held_out(name), name  # the evaluation's texts never appear
        (a, b), = doc.answer_spans
        answer = doc.text[a:b]
        assert doc.text[:a].endswith("<|im_start|>assistant\n")
        assert not any(re.search(rf"\b{w}\b", doc.text) for w in WORDS)  # not the evaluation's words
        assert not any(n.split("{key}")[0] in doc.text for n in NEEDLES.values())  # nor its sentences
        ids = tokenize_document(doc, 32, tok)
        w = token_weights(doc, 32, tok)
        assert ids.shape == w.shape
        assert tok.decode(ids[w > 1].tolist()).strip() == answer.strip()
        assert (ids == tok.landmark_id).sum() == ids.numel() // 32
        assert tok.encode("<|im_start|>", specials=True)[0] in ids.tolist()  # the template's tokens, not text
    assert src.document(3) == src.document(3)  # a pure function of (seed, i)


def test_windows_mask_padding_by_position_with_a_subword_tokenizer(pretrained):
    tok = load_tokenizer(pretrained)
    doc = Document("d", "The password is 4821." * 3)
    ids = tokenize_document(doc, 32, tok)
    x, y = window_at(ids, 0, 128, tok)
    n = ids.numel()
    assert (y[n - 1:] == -100).all() and (y[:n - 1] != -100).sum() > 0
    assert tok.pad_id == tok.eos_id  # pad = EOS here: masking by id would drop the real EOS target
    assert y[n - 2] == tok.eos_id


def test_init_model_is_the_init_from_model_with_overrides(pretrained, tmp_path):
    cfg = _ft(pretrained, tmp_path).model_config()
    assert cfg.attention == "landmark" and cfg.max_seq_len == 128 and cfg.d_model == 64
    with pytest.raises(ValueError, match="init_from"):
        TrainConfig(model="init")
    with pytest.raises(ValueError, match="no config.json"):
        _ft(tmp_path / "missing", tmp_path)


# ------------------------------------------------------------------------------- training


def test_lora_finetune_trains_only_the_adapter_resumes_exactly_and_exports(tmp_path, pretrained):
    from engine.checkpoint import read_model
    from train.checkpoint import find_checkpoint

    full = train(_ft(pretrained, tmp_path / "a"), ds=NO_OFFLOAD, progress=False)
    assert len(full.losses) == 4
    half = train(_ft(pretrained, tmp_path / "b"), ds=NO_OFFLOAD, progress=False, stop_after=2)
    rest = train(_ft(pretrained, tmp_path / "b"), ds=NO_OFFLOAD, progress=False, resume=True)
    assert half.losses + rest.losses == pytest.approx(full.losses, abs=1e-6)
    ck = find_checkpoint(tmp_path / "a")
    # the checkpoint: merged weights (a model every command loads), the adapter, the tokenizer
    assert {"adapter.safetensors", "adapter_config.json", "tokenizer.json", "model.safetensors"} <= {
        p.name for p in ck.iterdir()}
    _, merged = read_model(ck)
    _, base = read_model(pretrained)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith(("wq.weight", "wk.weight", "wv.weight", "wo.weight", "tok_emb.weight"))
                           for k in changed), changed
    emb_rows = (base["tok_emb.weight"] != merged["tok_emb.weight"]).any(1).nonzero().flatten().tolist()
    assert emb_rows == [merged["tok_emb.weight"].shape[0] - 1]  # only the landmark's row
    # the adapter alone loads to the same model as the merged weights
    ad = tmp_path / "adapter-only"
    ad.mkdir()
    for name in ("adapter.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json"):
        (ad / name).write_bytes((ck / name).read_bytes())
    x = torch.randint(0, 300, (1, 60))
    with torch.no_grad():
        assert torch.allclose(load_model(ad)(x), load_model(ck)(x), atol=1e-5)


def test_adapter_tensors_load_back_into_a_fresh_lora_model():
    from engine.errors import CheckpointMismatchError
    from train.finetune import load_adapter_tensors

    spec = LoraSpec(rank=4, alpha=8.0, targets=("wq", "wv"), landmark_id=259)
    trained = apply_lora(_landmark_model(), spec)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    tensors = adapter_state(trained.state_dict(), spec)
    fresh = apply_lora(_landmark_model(), spec)
    load_adapter_tensors(fresh, tensors, spec)
    got = adapter_state(fresh.state_dict(), spec)
    assert set(got) == set(tensors) and all(torch.equal(got[k], tensors[k]) for k in got)
    with pytest.raises(CheckpointMismatchError, match="rank"):
        load_adapter_tensors(apply_lora(_landmark_model(), LoraSpec(rank=2, targets=("wq", "wv"), landmark_id=259)),
                             tensors, spec)
    with pytest.raises(CheckpointMismatchError, match="no tensor for"):
        load_adapter_tensors(apply_lora(_landmark_model(), LoraSpec(rank=4, targets=("wq", "wv", "wo"),
                                                                    landmark_id=259)), tensors, spec)


def test_a_run_from_an_adapter_directory_continues_its_lora_on_the_same_base(tmp_path, pretrained):
    from engine.adapter import read_adapter
    from train.checkpoint import find_checkpoint
    from train.errors import CheckpointError

    train(_ft(pretrained, tmp_path / "a", max_steps=2), ds=NO_OFFLOAD, progress=False)
    ck = find_checkpoint(tmp_path / "a")
    ad = tmp_path / "adapter-only"
    ad.mkdir()
    for name in ("adapter.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json"):
        (ad / name).write_bytes((ck / name).read_bytes())
    _, start = read_adapter(ad)
    more = train(_ft(ad, tmp_path / "c", max_steps=2, seed=5), ds=NO_OFFLOAD, progress=False)
    fresh = train(_ft(pretrained, tmp_path / "f", max_steps=2, seed=5), ds=NO_OFFLOAD, progress=False)
    meta, after = read_adapter(find_checkpoint(tmp_path / "c"))
    assert meta["base"] == str(pretrained)  # the continued adapter applies to the same base model
    assert more.losses[0] != pytest.approx(fresh.losses[0], abs=1e-6)  # it started from the adapter, not zero
    # after two more steps the LoRA weights are near where they started (lr 1e-2), far from a fresh B = 0
    b = [k for k in after if ".lora_B" in k]
    moved = sum((after[k] - start[k]).norm() for k in b)
    assert moved < sum(start[k].norm() for k in b)
    # ... and loads as base + adapter like any other
    x = torch.randint(0, 300, (1, 60))
    with torch.no_grad():
        assert torch.isfinite(load_model(find_checkpoint(tmp_path / "c"))(x)).all()
    with pytest.raises(CheckpointError, match="rank 4 .run: 2"):
        train(_ft(ad, tmp_path / "d", lora_rank=2), ds=NO_OFFLOAD, progress=False)


def test_lora_run_through_cpu_offload_zero2(tmp_path, pretrained):
    res = train(_ft(pretrained, tmp_path / "o", max_steps=2), ds=DSOptions(offload="optimizer"), progress=False)
    assert len(res.losses) == 2 and all(l == l for l in res.losses)


def test_full_finetune_from_a_pretrained_model(tmp_path, pretrained):
    from engine.checkpoint import read_model
    from train.checkpoint import find_checkpoint

    res = train(_ft(pretrained, tmp_path / "f", lora_rank=0, max_steps=2), ds=NO_OFFLOAD, progress=False)
    _, merged = read_model(find_checkpoint(tmp_path / "f"))
    _, base = read_model(pretrained)
    assert not torch.equal(base["layers.0.ffn.w_up.weight"], merged["layers.0.ffn.w_up.weight"])
    assert len(res.losses) == 2


@pytest.mark.slow
def test_smollm2_landmark_preset_trains_a_few_steps(tmp_path):
    """The shipped adapter's command, stage 2b (from stage 1's committed adapter), trains; stage
    1's preset is the same LoRA run from the imported base (one training test for both: the
    suite's time)."""
    if not Path("models/smollm2-135m/config.json").is_file():
        pytest.skip("models/smollm2-135m is made by `make model`")
    stage1 = train_preset("smollm2-landmark")
    tcfg = train_preset("smollm2-landmark-decode", max_steps=2, warmup_steps=1, save_every=0,
                        out_dir=str(tmp_path / "s"))
    assert stage1.init_from == "models/smollm2-135m" and tcfg.init_from == "models/smollm2-135m-landmark"
    assert (stage1.lora_rank, stage1.window_len, stage1.retrieval) == (tcfg.lora_rank, tcfg.window_len, tcfg.retrieval)
    res = train(tcfg, ds=DSOptions(), progress=False)
    assert len(res.losses) == 2 and all(0 < l < 20 for l in res.losses)
    assert (res.checkpoint / "adapter.safetensors").stat().st_size < 10 << 20


def test_cli_finetune_and_the_three_export_formats(tmp_path, pretrained):
    from train.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--init-from", str(pretrained), "--model-set", "attention=landmark",
               "--model-set", "max_seq_len=128", "--data", "needles:answer_weight=4", "--window", "128",
               "--lora-rank", "4", "--lora-targets", "wq,wv", "--steps", "2", "--micro-batch", "1",
               "--offload", "none", "--out", str(out), "--no-progress"])
    assert rc == 0
    meta = json.loads((out / "train_config.json").read_text())
    assert meta["model"] == "init" and meta["lora_targets"] == ["wq", "wv"] and meta["model_overrides"] == {
        "attention": "landmark", "max_seq_len": 128}
    assert main(["export", str(out), "--out", str(tmp_path / "merged")]) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "adapter"), "--format", "adapter"]) == 0
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    x = torch.randint(0, 300, (1, 50))
    with torch.no_grad():
        assert torch.allclose(load_model(tmp_path / "merged")(x), load_model(tmp_path / "adapter")(x), atol=1e-5)
    pytest.importorskip("transformers")
    assert main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    # a run without adapters has none to export
    assert main(["export", str(pretrained), "--out", str(tmp_path / "none"), "--format", "adapter"]) == 2


def test_two_process_lora_run(tmp_path, pretrained):
    """torchrun, 2 processes (gloo): LoRA on the pretrained model, one merged checkpoint + adapter."""
    import os
    import signal
    import subprocess
    import sys

    from tests.train.test_distributed import ROOT, _free_port
    from train.checkpoint import find_checkpoint, read_meta

    out = tmp_path / "run2"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "train.cli", "train", "--init-from", str(pretrained), "--model-set", "attention=landmark",
           "--model-set", "max_seq_len=128", "--window", "128", "--data", "needles:answer_weight=4",
           "--lora-rank", "4", "--steps", "2", "--micro-batch", "1", "--offload", "none", "--no-progress",
           "--set", "retrieval=true", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    ck = find_checkpoint(out)
    assert read_meta(ck)["world_size"] == 2 and (ck / "adapter.safetensors").is_file()
    load_model(ck)


@pytest.mark.parametrize("name", ["smollm2-135m-landmark", "smollm2-135m-landmark-decode"])
def test_the_shipped_adapter_loads_on_its_base(name):
    """models/smollm2-135m-landmark and its stage 2b (committed, a few MB each) on
    models/smollm2-135m (`make model`)."""
    root = Path(__file__).resolve().parents[2]
    tuned_dir, base_dir = root / "models" / name, root / "models" / "smollm2-135m"
    if not (tuned_dir / "adapter_config.json").is_file():
        pytest.skip("no shipped adapter in this checkout")
    if not (base_dir / "config.json").is_file():
        pytest.skip("models/smollm2-135m is made by `make model`")
    size = sum(p.stat().st_size for p in tuned_dir.iterdir())
    assert size < 10 << 20
    meta = json.loads((tuned_dir / "adapter_config.json").read_text())
    from engine.checkpoint import load_config

    assert meta["base_fingerprint"] == load_config(base_dir).fingerprint()
    model = load_model(tuned_dir)
    tok = load_tokenizer(tuned_dir)
    assert model.cfg.landmarks and model.cfg.vocab_size == tok.vocab_size == 49153
    base = load_model(base_dir)
    assert not torch.equal(base.layers[3].attn.wq.weight, model.layers[3].attn.wq.weight)
    assert torch.equal(base.layers[3].ffn.w_up.weight, model.layers[3].ffn.w_up.weight)  # not adapted
