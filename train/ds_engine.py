"""All DeepSpeed glue: ds_config loading and filling, process setup, engine, checkpoints.

This is the only module of Folio that imports deepspeed, and it does so lazily (inside
functions), so `import train` never pays for it. What it owns:

- `load_ds_config(path)`: read and validate ds_config.json (DeepSpeed settings only).
- `apply_overrides(ds, zero_stage=, offload=, nvme_path=)`: the CLI's offload choices.
- `resolve_ds_config(ds, tcfg, world_size=)`: fill the fields the TrainConfig determines
  (micro-batch, accumulation, train_batch_size, lr, weight decay, clipping, precision);
  a value that contradicts the TrainConfig is a `DSConfigError` naming both.
  "auto" (or absent) means "take it from the TrainConfig / the machine".
- `distributed_env()`: a single plain process gets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*
  defaults, so the same code runs alone, under torchrun and under the deepspeed launcher.
- `initialize`, `save_checkpoint`, `load_checkpoint`, `gather_state_dict`, `shutdown`.

DeepSpeed JIT-compiles its C++ ops on first use, which takes a minute or more each. So
without optimizer offload we ask for torch's Adam (`torch_adam`), which needs no build, and
on CPU we skip the shared-memory all-reduce op, which only DeepSpeed inference uses.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train.config import TrainConfig
from train.errors import DSConfigError

OFFLOAD_TARGETS = ("optimizer", "param")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
AUTO = "auto"


def default_ds_config_path() -> Path:
    """ds_config.json of the current directory if there is one, else the repository's."""
    here = Path("ds_config.json")
    if here.is_file():
        return here
    return Path(__file__).resolve().parent.parent / "ds_config.json"


# ---------------------------------------------------------------------------- config


def _err(source: str, msg: str) -> DSConfigError:
    return DSConfigError(f"{source}: {msg}")


def validate_ds_config(ds: dict[str, Any], source: str = "ds_config") -> None:
    """Check the parts of a DeepSpeed config Folio relies on; raise DSConfigError naming the problem."""
    if not isinstance(ds, dict):
        raise _err(source, f"must hold a JSON object, got {type(ds).__name__}")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise _err(source, "zero_optimization must be an object")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise _err(source, f"zero_optimization.stage={stage!r} is invalid: one of 0, 1, 2, 3")
    for what in OFFLOAD_TARGETS:
        off = zero.get(f"offload_{what}")
        if off is None:
            continue
        key = f"zero_optimization.offload_{what}"
        if not isinstance(off, dict):
            raise _err(source, f"{key} must be an object")
        dev = off.get("device", "none")
        if dev not in OFFLOAD_DEVICES:
            raise _err(source, f"{key}.device={dev!r} is invalid: one of {OFFLOAD_DEVICES}")
        if dev == "nvme" and not off.get("nvme_path"):
            raise _err(source, f"{key}.device='nvme' needs {key}.nvme_path")
        if what == "param" and dev != "none" and stage != 3:
            raise _err(source, f"{key}.device={dev!r} needs zero_optimization.stage=3, got {stage}")
        if what == "optimizer" and dev != "none" and stage == 0:
            raise _err(source, f"{key}.device={dev!r} needs zero_optimization.stage >= 1, got 0")
    for prec in ("bf16", "fp16"):
        sec = ds.get(prec, {})
        if not isinstance(sec, dict) or sec.get("enabled", False) not in (True, False, AUTO):
            raise _err(source, f"{prec}.enabled must be true, false or \"auto\"")
    if ds.get("bf16", {}).get("enabled") is True and ds.get("fp16", {}).get("enabled") is True:
        raise _err(source, "bf16.enabled and fp16.enabled are both true; enable at most one")
    opt = ds.get("optimizer")
    if opt is not None and (not isinstance(opt, dict) or not isinstance(opt.get("type"), str)
                            or not isinstance(opt.get("params", {}), dict)):
        raise _err(source, "optimizer must be an object with a string 'type' and a 'params' object")


def load_ds_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a ds_config.json. Raises DSConfigError naming the file and the problem."""
    p = Path(path)
    if not p.is_file():
        raise DSConfigError(f"{p}: DeepSpeed config file does not exist")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DSConfigError(f"{p}: malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DSConfigError(f"{p}: cannot be read: {e}") from None
    validate_ds_config(ds, str(p))
    return ds


def apply_overrides(ds: dict[str, Any], *, zero_stage: int | None = None,
                    offload: str | None = None, nvme_path: str | None = None) -> dict[str, Any]:
    """A copy of `ds` with the CLI's ZeRO / offload choices applied.

    zero_stage: 0..3. offload: 'none', or a comma list of 'optimizer' and 'param' (param
    offload needs stage 3; asking for it with no stage given selects stage 3). nvme_path:
    offload the selected targets to NVMe files under this path instead of CPU memory.
    """
    ds = copy.deepcopy(ds)
    zero = ds.setdefault("zero_optimization", {})
    if zero_stage is not None:
        if zero_stage not in (0, 1, 2, 3):
            raise DSConfigError(f"--zero-stage={zero_stage} is invalid: one of 0, 1, 2, 3")
        zero["stage"] = zero_stage
    targets: set[str] | None = None
    if offload is not None:
        parts = {s.strip() for s in offload.split(",") if s.strip()}
        if parts == {"none"}:
            targets = set()
        elif not parts or not parts <= set(OFFLOAD_TARGETS):
            raise DSConfigError(f"--offload={offload!r} is invalid: 'none' or a comma list of {OFFLOAD_TARGETS}")
        else:
            targets = parts
        if "param" in targets and zero_stage is None:
            zero["stage"] = 3
    if targets is None and nvme_path is not None:
        # NVMe for whatever the config already offloads
        targets = {t for t in OFFLOAD_TARGETS
                   if zero.get(f"offload_{t}", {}).get("device", "none") != "none"}
    if targets is not None:
        device = "nvme" if nvme_path is not None else "cpu"
        for t in OFFLOAD_TARGETS:
            sec = dict(zero.get(f"offload_{t}", {}))
            sec["device"] = device if t in targets else "none"
            if t in targets and nvme_path is not None:
                sec["nvme_path"] = str(nvme_path)
            zero[f"offload_{t}"] = sec
    validate_ds_config(ds, "ds_config (after command-line overrides)")
    return ds


def _bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _fill(ds: dict, key: str, value: Any, tcfg_field: str, source: str) -> None:
    """Set ds[key] = value unless it is already set to something else (then it contradicts)."""
    cur = ds.get(key, AUTO)
    if cur == AUTO:
        ds[key] = value
    elif cur != value:
        raise DSConfigError(f"{source}: {key}={cur!r} contradicts {tcfg_field}={value!r} "
                            f"(set it to \"auto\" or remove it to take it from the training config)")


def resolve_ds_config(ds: dict[str, Any], tcfg: TrainConfig, *, world_size: int = 1,
                      source: str = "ds_config.json") -> dict[str, Any]:
    """The config handed to deepspeed.initialize: `ds` with every "auto" filled in.

    Raises DSConfigError naming both values when `ds` contradicts `tcfg`.
    """
    ds = copy.deepcopy(ds)
    validate_ds_config(ds, source)
    cuda = torch.cuda.is_available()
    _fill(ds, "train_micro_batch_size_per_gpu", tcfg.micro_batch, "TrainConfig.micro_batch", source)
    _fill(ds, "gradient_accumulation_steps", tcfg.grad_accum, "TrainConfig.grad_accum", source)
    _fill(ds, "train_batch_size", tcfg.micro_batch * tcfg.grad_accum * world_size,
          f"TrainConfig.micro_batch * grad_accum * world_size ({tcfg.micro_batch}*{tcfg.grad_accum}*{world_size})",
          source)
    _fill(ds, "gradient_clipping", float(tcfg.grad_clip), "TrainConfig.grad_clip", source)

    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    _fill(params, "lr", tcfg.lr, "TrainConfig.lr", f"{source} optimizer.params")
    _fill(params, "weight_decay", tcfg.weight_decay, "TrainConfig.weight_decay", f"{source} optimizer.params")

    zero = ds.setdefault("zero_optimization", {"stage": 0})
    offloaded = False
    for t in OFFLOAD_TARGETS:
        sec = zero.get(f"offload_{t}")
        if sec is None:
            continue
        if sec.get("pin_memory", AUTO) == AUTO:
            sec["pin_memory"] = cuda  # pinned host memory only helps copies to a GPU
        if sec.get("device", "none") == "none":
            # DeepSpeed's config model treats a present section as "offload on"
            del zero[f"offload_{t}"]
        elif t == "optimizer":
            offloaded = True
    if not offloaded and opt["type"].lower() in ("adam", "adamw") and "torch_adam" not in params:
        params["torch_adam"] = True  # no fused_adam JIT build when nothing is offloaded

    # precision: the TrainConfig decides unless it says "auto"; then ds_config, then the machine
    want = {"fp32": (False, False), "bf16": (True, False), "fp16": (False, True)}
    bf16 = ds.setdefault("bf16", {}).get("enabled", AUTO)
    fp16 = ds.setdefault("fp16", {}).get("enabled", AUTO)
    if tcfg.precision == "auto":
        if bf16 == AUTO:
            bf16 = fp16 is not True and _bf16_supported()
        if fp16 == AUTO:
            fp16 = False
    else:
        wb, wf = want[tcfg.precision]
        for name, cur, w in (("bf16.enabled", bf16, wb), ("fp16.enabled", fp16, wf)):
            if cur != AUTO and cur != w:
                raise DSConfigError(f"{source}: {name}={cur!r} contradicts TrainConfig.precision="
                                    f"{tcfg.precision!r} (set it to \"auto\" or change precision)")
        bf16, fp16 = wb, wf
    ds["bf16"]["enabled"], ds["fp16"]["enabled"] = bool(bf16), bool(fp16)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def precision_of(ds: dict[str, Any]) -> str:
    """'bf16', 'fp16' or 'fp32' for a resolved config."""
    if ds.get("bf16", {}).get("enabled") is True:
        return "bf16"
    if ds.get("fp16", {}).get("enabled") is True:
        return "fp16"
    return "fp32"


# ---------------------------------------------------------------------------- processes


@dataclass(frozen=True, slots=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    launched: bool
    """True under torchrun / the deepspeed launcher (they set RANK etc.)."""
    backend: str
    """torch.distributed backend: 'nccl' on CUDA, 'gloo' on CPU."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def distributed_env() -> Iterator[DistEnv]:
    """Environment for one training job; restores what it set on exit.

    A plain process gets RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, MASTER_ADDR=127.0.0.1 and a
    free MASTER_PORT; under a launcher its values are kept. Without CUDA, DeepSpeed is
    told to use its CPU accelerator (DS_ACCELERATOR=cpu) before it is imported.
    """
    cuda = torch.cuda.is_available()
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    if not cuda:
        defaults["DS_ACCELERATOR"] = "cpu"
    set_here = [k for k in defaults if k not in os.environ]
    for k in set_here:
        os.environ[k] = defaults[k]
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
        set_here.append("MASTER_PORT")
    if "LOCAL_RANK" in set_here and launched:
        os.environ["LOCAL_RANK"] = os.environ["RANK"]  # single node launchers without LOCAL_RANK
    try:
        yield DistEnv(rank=int(os.environ["RANK"]), local_rank=int(os.environ["LOCAL_RANK"]),
                      world_size=int(os.environ["WORLD_SIZE"]), launched=launched,
                      backend="nccl" if cuda else "gloo")
    finally:
        for k in set_here:
            os.environ.pop(k, None)


def device_for(env: DistEnv) -> torch.device:
    """This process's device: its CUDA card, or the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def _import_deepspeed(verbose: bool = False) -> Any:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # noqa: PLC0415 - lazy on purpose: the import is slow and pulls in a lot
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    return deepspeed


def initialize(model: torch.nn.Module, ds: dict[str, Any], env: DistEnv, *,
               lr_lambda: Callable[[int], float] | None = None, verbose: bool = False) -> Any:
    """Start torch.distributed (if needed) and wrap `model` in a DeepSpeed engine.

    `ds` must be resolved (`resolve_ds_config`). lr_lambda(step) -> multiplier of the
    peak lr (a LambdaLR DeepSpeed steps and checkpoints). Returns the engine.
    """
    device_for(env)  # on CUDA: this process's card before any allocation
    deepspeed = _import_deepspeed(verbose)
    if env.backend == "gloo":
        # The CPU shared-memory all-reduce op (a slow JIT build) serves only DeepSpeed
        # inference; training all-reduces through gloo either way. The dict is the one
        # DeepSpeed caches and consults (deepspeed/ops/__init__.py), so the edit holds.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=env.backend, verbose=verbose)
    scheduler = None
    if lr_lambda is not None:
        def scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    try:
        # only what requires a gradient is optimized (a LoRA run freezes the base model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable,
                                               config=ds, lr_scheduler=scheduler)
    except (ValueError, AssertionError, KeyError) as e:
        raise DSConfigError(f"DeepSpeed rejected the config: {e}") from e
    return engine


def save_checkpoint(engine: Any, save_dir: str | os.PathLike, tag: str, client_state: dict) -> None:
    """DeepSpeed checkpoint (model, optimizer, scheduler, client_state) at save_dir/tag; all ranks call it."""
    frozen = any(not p.requires_grad for p in engine.module.parameters())
    # a frozen base model is not part of the run's state: it is re-read from init_from on resume
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, exclude_frozen_parameters=frozen)


def load_checkpoint(engine: Any, load_dir: str | os.PathLike, tag: str) -> dict:
    """Restore a DeepSpeed checkpoint written by `save_checkpoint`; returns its client_state.

    DeepSpeed's own files are torch pickles it reads itself: load only checkpoints you
    wrote. Exported models (`train/checkpoint.py`) are safetensors + JSON.
    """
    frozen = any(not p.requires_grad for p in engine.module.parameters())
    path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True, load_module_strict=not frozen)
    if path is None:
        from train.errors import CheckpointError

        raise CheckpointError(f"{Path(load_dir) / tag}: DeepSpeed found no checkpoint to load")
    return client_state or {}


def gather_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """The full model state_dict on rank 0 (None elsewhere), as float32 CPU tensors.

    Under ZeRO-3 the parameters are partitioned, so every rank must call this.
    """
    module = engine.module
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
    if engine.zero_optimization_stage() == 3:
        deepspeed = _import_deepspeed()
        ctx = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    with ctx:
        if rank != 0:
            return None
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()}


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce across the job (no-op for one process)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        rop = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
        torch.distributed.all_reduce(t, op=rop)
    return t


def shutdown(engine: Any | None) -> None:
    """Release the engine and the process group (so a later run in this process starts clean)."""
    if engine is not None:
        engine.destroy()
    if torch.distributed.is_initialized():
        import sys

        if "deepspeed" in sys.modules:
            # DeepSpeed's wrapper also drops its cached groups (world, data parallel), which
            # would otherwise point at the dead process group in the next run.
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()
        else:
            torch.distributed.destroy_process_group()
