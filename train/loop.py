"""The training loop: windows of long documents through a DeepSpeed engine, with checkpoints.

`train(tcfg)` checks everything that can be checked before any training starts (the
ds_config, the data sources, a resume checkpoint's model shape), then runs

    loss = engine(tokens, targets, memory=...); engine.backward(loss); engine.step()

over `LaneBatcher` batches (one document per lane, its windows in order), writes
metrics.jsonl and a progress bar, checkpoints every `save_every` steps, at the end, and
when SIGTERM/SIGINT arrives (after the step in flight), and draws loss.png at the end.

Resume is exact: a checkpoint holds the DeepSpeed state (weights, optimizer, lr
schedule), the data position of every process and their RNG states, so on CPU an
interrupted-and-resumed run reproduces the losses of an uninterrupted one.

Retrieval seam: `memory` (a `train.windows.WindowMemory`) follows each lane's document;
what its `for_step` returns is passed to the model as `memory=` (None = plain window).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine import runtime
from engine.checkpoint import read_model, write_model
from engine.config import ModelConfig
from engine.landmarks import IGNORE_INDEX
from train import ds_engine
from train.checkpoint import CHECKPOINTS, check_model_matches, config_diff, find_checkpoint, prune_checkpoints, step_tag, write_meta
from train.config import TrainConfig
from train.data import DocumentMixer, DocumentSource, build_source
from train.evaluate import evaluate_loss
from train.store_memory import set_query_keep, set_token_rows
from train.errors import CheckpointError, TrainError
from train.metrics import MetricsLog, Progress, plot_loss
from train.process_state import StopFlag, gather, rng_state, seed_all, set_rng_state
from train.windows import LaneBatcher, NoMemory, WindowMemory

ModelFactory = Callable[[ModelConfig], torch.nn.Module]
# TrainConfig fields that must match for a resumed run to continue the same data stream.
_RESUME_FIXED = ("model", "data", "data_weights", "jsonl_field", "synthetic_chars", "window_len",
                 "micro_batch", "grad_accum", "seed", "init_from", "lora_rank", "lora_alpha", "lora_targets",
                 "lora_train_landmark")


class LanguageModelLoss(torch.nn.Module):
    """Wraps a model `(B, T) tokens -> (B, T, V) logits` into `(tokens, targets) -> mean loss`.

    DeepSpeed engines return what the module returns, so the loss is computed inside.
    `memory` is forwarded to the model only when not None (plain models need not know it).
    Targets may carry integer loss weights (answer tokens, `train.windows.pack_targets`);
    then the loss is the weighted mean sum(w * ce) / sum(w) over predicted positions,
    and with all weights 1 it is the plain mean, computed exactly as before.
    """

    def __init__(self, model: torch.nn.Module, impl: str = "auto") -> None:
        super().__init__()
        self.model = model
        self.kw = {} if impl == "auto" else {"impl": impl}  # plain models need not know impl

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor, memory: Any = None) -> torch.Tensor:
        logits = self.model(tokens, **self.kw) if memory is None else self.model(tokens, memory=memory, **self.kw)
        return lm_loss(logits, targets)  # logits (B, T, V)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of logits (B, T, V) against packed targets (B, T) (see
    `LanguageModelLoss`)."""
    from train.windows import unpack_targets

    targets, weights = unpack_targets(targets)  # (B, T), (B, T) | None
    flat = logits.float().flatten(0, 1)  # (B*T, V)
    if weights is None:
        return F.cross_entropy(flat, targets.flatten(), ignore_index=IGNORE_INDEX)
    ce = F.cross_entropy(flat, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")  # (B*T,)
    w = torch.where(targets.flatten() == IGNORE_INDEX, 0, weights.flatten()).to(ce.dtype)  # (B*T,)
    return (ce * w).sum() / w.sum().clamp_min(1.0)


def default_model_factory(cfg: ModelConfig) -> torch.nn.Module:
    """The engine's landmark transformer."""
    try:
        from engine.model import LandmarkTransformer
    except ImportError as e:
        raise TrainError(f"engine.model.LandmarkTransformer is not available: {e}") from e
    return LandmarkTransformer(cfg)


@dataclass(kw_only=True, slots=True)
class DSOptions:
    """DeepSpeed choices of a run besides the TrainConfig."""

    config: str | os.PathLike | dict | None = None
    """Path of ds_config.json, an already loaded dict, or None for the default file."""
    zero_stage: int | None = None
    """Override zero_optimization.stage (0..3)."""
    offload: str | None = None
    """Override what is offloaded: 'none' or a comma list of 'optimizer', 'param'."""
    nvme_path: str | None = None
    """Offload to NVMe files under this path instead of CPU memory."""
    verbose: bool = False
    """Let DeepSpeed log at INFO level."""

    def load(self) -> dict[str, Any]:
        """The validated ds_config dict with the overrides applied (not yet resolved)."""
        if isinstance(self.config, dict):
            ds = dict(self.config)
            ds_engine.validate_ds_config(ds, "ds_config (dict)")
        else:
            ds = ds_engine.load_ds_config(self.config or ds_engine.default_ds_config_path())
        if self.zero_stage is not None or self.offload is not None or self.nvme_path is not None:
            ds = ds_engine.apply_overrides(ds, zero_stage=self.zero_stage, offload=self.offload,
                                           nvme_path=self.nvme_path)
        return ds


@dataclass(slots=True)
class TrainResult:
    """What a finished (or stopped) run leaves behind."""

    step: int
    losses: list[float] = field(default_factory=list)
    """Losses of the steps run by this call (rank-averaged)."""
    out_dir: Path = Path(".")
    checkpoint: Path | None = None
    stopped_by: str | None = None
    """'SIGINT' / 'SIGTERM' when a signal stopped the run, 'stop_after' when asked to stop early."""
    eval_loss: float | None = None
    """Held-out loss of the final model (TrainConfig.eval_windows > 0), nats per token."""
    tokens_per_s: float = 0.0
    """Mean training throughput of this call (all processes, padding excluded)."""
    loss_png: Path | None = None


def run_tokenizer(tcfg: TrainConfig, mcfg: ModelConfig):
    """The run's tokenizer: init_from's own (a pretrained checkpoint's tokenizer.json, the
    landmark at the model's last row) when it has one, else the byte tokenizer."""
    from engine.tokenizer import ByteTokenizer, load_tokenizer

    if tcfg.init_from and (Path(tcfg.init_from) / "tokenizer.json").is_file():
        tok = load_tokenizer(tcfg.init_from, model_vocab=mcfg.vocab_size - 1)
        if tok.vocab_size != mcfg.vocab_size:
            raise TrainError(f"init_from={tcfg.init_from!r}: its tokenizer has {tok.vocab_size} ids, "
                             f"the model {mcfg.vocab_size}")
        return tok
    return ByteTokenizer()


def _fingerprint_of(directory: str | None) -> str | None:
    from engine.checkpoint import load_config

    return load_config(directory).fingerprint() if directory else None


def lora_spec(tcfg: TrainConfig, mcfg: ModelConfig):
    """The run's LoraSpec, or None for full training."""
    if not tcfg.lora_rank:
        return None
    from train.finetune import LoraSpec

    return LoraSpec(rank=tcfg.lora_rank, alpha=tcfg.lora_alpha, targets=tcfg.lora_targets,
                    dropout=tcfg.lora_dropout, train_landmark=tcfg.lora_train_landmark and mcfg.landmarks,
                    landmark_id=mcfg.vocab_size - 1)


def lr_multiplier(tcfg: TrainConfig) -> Callable[[int], float]:
    """Linear warmup to the peak, then cosine decay to min_lr_ratio at max_steps."""
    def f(step: int) -> float:
        if step < tcfg.warmup_steps:
            return (step + 1) / tcfg.warmup_steps
        span = max(1, tcfg.max_steps - tcfg.warmup_steps)
        t = min(1.0, (step - tcfg.warmup_steps) / span)
        return tcfg.min_lr_ratio + (1 - tcfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def _check_resume_config(meta: dict[str, Any], tcfg: TrainConfig, step_dir: Path, world_size: int) -> None:
    theirs = meta.get("train_config", {})
    mine = tcfg.to_dict()
    for k in _RESUME_FIXED:
        if k in theirs and theirs[k] != mine[k]:
            raise CheckpointError(f"{step_dir}: resume needs TrainConfig.{k}={theirs[k]!r} as in the "
                                  f"checkpoint, this run has {mine[k]!r}")
    if meta.get("world_size", 1) != world_size:
        raise CheckpointError(f"{step_dir}: written by {meta.get('world_size')} processes, this run has "
                              f"{world_size}; resume with the same number of processes")


def _init_state(path: str, mcfg: ModelConfig, *, derived: bool = False) -> dict[str, torch.Tensor]:
    """Weights of the exported model at `path`; refuses one of another model config
    (`derived`: the run's config is that model's with overrides; then only the weights'
    shapes must fit, which loading checks)."""
    from train.errors import CheckpointMismatchError

    theirs, state = read_model(path)
    if derived:
        return state
    diff = config_diff(theirs.to_dict(), mcfg.to_dict())
    if diff:
        raise CheckpointMismatchError(f"init_from={path!r}: that model has {diff[0]}; this run's model has {diff[1]}")
    return state


@dataclass(frozen=True)
class _Start:
    """Where a run's weights come from: `init_from` itself, or, when that is an adapter
    directory, its base model (the frozen weights, and what checkpoints' adapters record) and
    its tensors (a LoRA run continues them; a full run trains the merged model)."""
    base: str | None
    adapter: dict[str, torch.Tensor] | None = None

    @staticmethod
    def of(tcfg: TrainConfig, lora) -> "_Start":
        from engine.adapter import is_adapter_dir, read_adapter, resolve_base

        if not tcfg.init_from or not is_adapter_dir(tcfg.init_from):
            return _Start(tcfg.init_from)
        meta, tensors = read_adapter(tcfg.init_from)
        base = resolve_base(tcfg.init_from, meta["base"])
        if lora is not None:
            mine = lora.to_dict()
            theirs = meta.get("lora", {})
            diff = {k: (theirs.get(k), mine[k]) for k in ("rank", "targets", "train_landmark", "landmark_id")
                    if theirs.get(k) != mine[k]}
            if diff:
                raise CheckpointError(f"init_from={tcfg.init_from!r}: the adapter's LoRA differs from this run's "
                                      + ", ".join(f"{k} {a!r} (run: {b!r})" for k, (a, b) in diff.items())
                                      + "; continue it with the same --lora-rank and targets")
        return _Start(str(base), tensors)

    def state(self, tcfg: TrainConfig, mcfg: ModelConfig, lora) -> dict[str, torch.Tensor]:
        if self.adapter is None:
            return _init_state(self.base, mcfg, derived=tcfg.model == "init")
        if lora is not None:  # the frozen base; the adapter's tensors go into the LoRA weights
            return _init_state(self.base, mcfg, derived=True)
        from engine.adapter import load_adapted

        return load_adapted(tcfg.init_from)[1]


def train(tcfg: TrainConfig, *, ds: DSOptions | None = None, resume: str | os.PathLike | bool | None = None,
          model_factory: ModelFactory | None = None, memory: WindowMemory | None = None,
          stop_after: int | None = None, progress: bool = True,
          on_step: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Train `tcfg` with DeepSpeed; returns a TrainResult.

    ds: ds_config source and offload overrides. resume: True (the newest checkpoint in
    tcfg.out_dir), a path (run dir, checkpoints/ dir or one step dir), or None/False.
    model_factory: ModelConfig -> nn.Module (default: engine.model.LandmarkTransformer).
    memory: retrieval hooks per document (default NoMemory: plain windows).
    stop_after: stop (with a checkpoint) after this many steps of the schedule.
    on_step(step, record): called on every process after each step.

    Raises before any training starts: DSConfigError (missing / malformed / contradicting
    ds_config), DataError (missing path, no text), CheckpointError /
    CheckpointMismatchError (no checkpoint, another model shape, another data setup).
    """
    ds = ds or DSOptions()
    mcfg = tcfg.model_config()
    out_dir = Path(tcfg.out_dir)
    ds_raw = ds.load()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    source = ("ds_config (dict)" if isinstance(ds.config, dict)
              else str(ds.config or ds_engine.default_ds_config_path()))
    ds_cfg = ds_engine.resolve_ds_config(ds_raw, tcfg, world_size=world_size, source=source)
    tok = run_tokenizer(tcfg, mcfg)
    chat = tok.chat_parts()
    sources = [build_source(s, seed=tcfg.seed, jsonl_field=tcfg.jsonl_field,
                            synthetic_chars=tcfg.synthetic_chars, chat=chat) for s in tcfg.data]
    step_dir: Path | None = None
    meta: dict[str, Any] = {}
    if resume:
        step_dir = find_checkpoint(out_dir if resume is True else resume)
        meta = check_model_matches(step_dir, mcfg)
        _check_resume_config(meta, tcfg, step_dir, world_size)
    factory = model_factory or default_model_factory
    lora = lora_spec(tcfg, mcfg)
    # a LoRA run's frozen base is not in its DeepSpeed checkpoint: a resume re-reads it
    need_init = tcfg.init_from and (step_dir is None or lora is not None)
    start = _Start.of(tcfg, lora)
    init_state = start.state(tcfg, mcfg, lora) if need_init else None
    eval_source = (build_source(tcfg.eval_data, seed=tcfg.seed, jsonl_field=tcfg.jsonl_field,
                                synthetic_chars=tcfg.synthetic_chars, chat=chat)
                   if tcfg.eval_windows else None)

    with ds_engine.distributed_env() as env, runtime.training_phase():  # freed pages kept between steps
        engine = None
        stop = StopFlag()
        try:
            seed_all(tcfg.seed)
            net = factory(mcfg)
            uio_fresh = False
            if init_state is not None:
                missing, unexpected = net.load_state_dict(init_state, strict=False)
                missing = [k for k in missing if not (mcfg.tie_embeddings and k == "lm_head.weight")]
                # UIO's modules are new when the model it starts from has none: they start fresh
                uio_fresh = mcfg.uio is not None and not any(k.startswith("uio.") for k in init_state)
                if uio_fresh:
                    missing = [k for k in missing if not k.startswith("uio.")]
                if missing or unexpected:
                    raise CheckpointError(f"init_from={tcfg.init_from!r}: its weights do not fit this run's "
                                          f"model: missing {missing[:4]}, unexpected {unexpected[:4]}")
            if mcfg.uio is not None:
                from train.uio_loop import prepare_uio_model

                prepare_uio_model(net, mcfg, tok, fresh=step_dir is None and (init_state is None or uio_fresh))
            if lora is not None:
                from train.finetune import apply_lora

                net = apply_lora(net, lora)
                if start.adapter is not None and step_dir is None:  # a resume has them in its checkpoint
                    from train.finetune import load_adapter_tensors

                    load_adapter_tensors(net, start.adapter, lora)
            if tcfg.activation_checkpointing:
                from engine.recompute import checkpoint_layers

                checkpoint_layers(net)
            model = LanguageModelLoss(net, impl=tcfg.attention_impl)
            engine = ds_engine.initialize(model, ds_cfg, env, lr_lambda=lr_multiplier(tcfg), verbose=ds.verbose)
            mixer = DocumentMixer(sources, tcfg.data_weights, seed=tcfg.seed, rank=env.rank,
                                  world_size=env.world_size)
            if memory is None and mcfg.folded_window:
                from train.folded_memory import FoldedWindowMemory

                memory = FoldedWindowMemory(mcfg, resume_dir=step_dir, rank=env.rank)
            if memory is None and tcfg.retrieval:
                from train.store_memory import StoreWindowMemory

                # one store per process; a resumed run reopens the one its checkpoint flushed
                memory = StoreWindowMemory(mcfg, out_dir / "train_store" / f"rank{env.rank}",
                                           top_k=tcfg.retrieval_top_k, sink_blocks=tcfg.retrieval_sink_blocks,
                                           window=tcfg.window,
                                           fresh=step_dir is None, kernel=tcfg.attention_impl,
                                           device_budget_bytes=tcfg.store_device_budget_bytes,
                                           host_budget_bytes=tcfg.store_host_budget_bytes)
            batcher = LaneBatcher(mixer, lanes=tcfg.micro_batch, window=tcfg.window,
                                  block_len=mcfg.block_len, memory=memory or NoMemory(), tokenizer=tok)
            step = 0
            if step_dir is not None:
                client = ds_engine.load_checkpoint(engine, step_dir.parent, step_dir.name)
                step = int(meta["step"])
                if client.get("step", step) != step:
                    raise CheckpointError(f"{step_dir}: DeepSpeed state is of step {client.get('step')}, "
                                          f"{step_dir.name}/folio_meta.json says {step}")
                mine = meta["ranks"][env.rank]
                batcher.load_state_dict(mine["data"])
                set_rng_state(mine["rng"])
            runner = _Runner(tcfg=tcfg, mcfg=mcfg, ds_cfg=ds_cfg, env=env, engine=engine, batcher=batcher,
                             out_dir=out_dir, stop=stop, factory=factory, eval_source=eval_source,
                             lora=lora, tokenizer=tok,
                             base=start.base,
                             base_fingerprint=_fingerprint_of(start.base) if lora is not None else None)
            stop.install()
            return runner.run(step, resumed=step_dir is not None, stop_after=stop_after,
                              progress=progress, on_step=on_step)
        finally:
            stop.restore()
            if memory is not None:
                memory.close()
            ds_engine.shutdown(engine)


@dataclass(kw_only=True)
class _Runner:
    """The loop proper, once the engine and the data are set up."""

    tcfg: TrainConfig
    mcfg: ModelConfig
    ds_cfg: dict[str, Any]
    env: ds_engine.DistEnv
    engine: Any
    batcher: LaneBatcher
    out_dir: Path
    stop: StopFlag
    factory: ModelFactory
    eval_source: DocumentSource | None = None
    lora: Any = None
    tokenizer: Any = None
    base: str | None = None  # the model directory an adapter applies to
    base_fingerprint: str | None = None

    def evaluate(self, step_dir: Path) -> float:
        """Held-out loss of the weights saved in `step_dir` (a plain model: works for every ZeRO stage)."""
        _, state = read_model(step_dir)
        model = self.factory(self.mcfg)
        model.load_state_dict(state, strict=not self.mcfg.tie_embeddings)
        model.to(self.engine.device)
        assert self.eval_source is not None
        res = evaluate_loss(model, self.eval_source, block_len=self.mcfg.block_len, window=self.tcfg.window,
                            max_windows=self.tcfg.eval_windows, tokenizer=self.tokenizer)
        return res.loss

    def save(self, step: int) -> Path:
        """Checkpoint at `step` (every process calls it); returns the step folder."""
        ck_dir = self.out_dir / CHECKPOINTS
        tag = step_tag(step)
        ranks = gather({"data": self.batcher.state_dict(), "rng": rng_state()})
        client = {"step": step, "ranks": ranks, "train_config": self.tcfg.to_dict(),
                  "model_config": self.mcfg.to_dict()}
        self.batcher.memory.checkpoint()  # retrieval store durable with the checkpoint
        ds_engine.save_checkpoint(self.engine, ck_dir, tag, client)
        self.batcher.memory.save_state(ck_dir / tag, self.batcher.lanes)  # e.g. folded carries
        state = ds_engine.gather_state_dict(self.engine)
        if self.env.is_main:
            assert state is not None
            weights = {k.removeprefix("model."): v for k, v in state.items()}
            if self.lora is not None:
                from train.finetune import merge_state, write_adapter

                write_adapter(ck_dir / tag, weights, self.lora, base=str(self.base),
                              model_config=self.mcfg.to_dict(), base_fingerprint=self.base_fingerprint)
                weights = merge_state(weights, self.lora)
            write_model(ck_dir / tag, weights, self.mcfg)
            if hasattr(self.tokenizer, "save"):
                self.tokenizer.save(ck_dir / tag)  # the checkpoint is a model directory every command takes
            write_meta(ck_dir / tag, {**client, "world_size": self.env.world_size,
                                      "fingerprint": self.mcfg.fingerprint(),
                                      "precision": ds_engine.precision_of(self.ds_cfg),
                                      "ds_config": self.ds_cfg})
            prune_checkpoints(ck_dir, self.tcfg.keep_checkpoints)
        ds_engine.barrier()
        return ck_dir / tag

    def run(self, step: int, *, resumed: bool, stop_after: int | None, progress: bool,
            on_step: Callable[[int, dict[str, Any]], None] | None) -> TrainResult:
        tcfg, env, engine = self.tcfg, self.env, self.engine
        main = env.is_main
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(self.out_dir / "metrics.jsonl", resume_step=step if resumed else None) if main else None
        if main and not resumed:
            tcfg.save_json(self.out_dir / "train_config.json")
            self.mcfg.save_json(self.out_dir / "model_config.json")
        end = min(tcfg.max_steps, stop_after) if stop_after is not None else tcfg.max_steps
        bar = Progress(tcfg.max_steps, initial=step, enabled=progress and main)
        result = TrainResult(step=step, out_dir=self.out_dir)
        last_saved = step if resumed else -1
        tok_total, time_total = 0.0, 0.0
        device = engine.device
        try:
            while step < end:
                t0 = time.perf_counter()
                lr = float(engine.get_lr()[0])  # the lr this step uses (the scheduler steps inside)
                loss_sum, n_tok = 0.0, 0
                for _ in range(tcfg.grad_accum):
                    if self.mcfg.uio is not None:  # whole TBPTT sequences of documents (train/uio_loop.py)
                        from train.uio_loop import uio_step

                        loss, n = uio_step(engine, self.batcher, self.mcfg, seed=(tcfg.seed, step, env.rank))
                        loss_sum += loss
                        n_tok += n
                        continue
                    batch = self.batcher.next_batch()
                    mem = self.batcher.memory.for_step(batch.lanes)
                    if tcfg.selection_before_answer:
                        set_query_keep(mem, batch.targets)
                    if tcfg.answer_token_selection:
                        set_token_rows(mem, batch.targets)
                    loss = engine(batch.tokens.to(device), batch.targets.to(device), memory=mem)
                    engine.backward(loss)
                    engine.step()
                    self.batcher.advance(batch)
                    loss_sum += float(loss.detach())
                    n_tok += batch.n_tokens
                step += 1
                # one all-reduce per step: mean loss, total tokens, and whether anyone was signalled
                stat = torch.tensor([loss_sum / tcfg.grad_accum, float(n_tok),
                                     1.0 if self.stop.signal else 0.0], dtype=torch.float64)
                stop_any = ds_engine.all_reduce_(stat[2:].clone(), "max")
                ds_engine.all_reduce_(stat[:2])
                dt = time.perf_counter() - t0
                tok_total += float(stat[1])
                time_total += dt
                record = {"step": step, "loss": float(stat[0]) / env.world_size,
                          "lr": lr, "tokens": int(stat[1]),
                          "tokens_per_s": float(stat[1]) / dt, "step_time_s": dt,
                          "pulled_bytes": self.batcher.memory.pulled_bytes([s for s in self.batcher.lanes
                                                                            if s is not None])}
                result.losses.append(record["loss"])
                if metrics is not None:
                    metrics.write(record)
                bar.update(record)
                if on_step is not None:
                    on_step(step, record)
                if stop_any.item() > 0 and self.stop.signal is None:
                    self.stop.signal = "SIGTERM"  # another process was signalled
                if self.stop.signal is not None or (tcfg.save_every and step % tcfg.save_every == 0):
                    result.checkpoint = self.save(step)
                    last_saved = step
                if self.stop.signal is not None:
                    result.stopped_by = self.stop.signal
                    break
            else:
                if stop_after is not None and step < tcfg.max_steps:
                    result.stopped_by = "stop_after"
            if last_saved != step:
                result.checkpoint = self.save(step)
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        result.step = step
        result.tokens_per_s = tok_total / time_total if time_total else 0.0
        if main:
            result.loss_png = plot_loss(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")
            if self.eval_source is not None and result.checkpoint is not None and result.stopped_by is None:
                result.eval_loss = self.evaluate(result.checkpoint)
        return result
