"""Does a landmark model's selection hold the pass key's blocks? Traced per forward.

    python -m bench.landmark_probe [--model DIR] [--filler F] [--length N] [--trials T]
                                   [--decode-reselect R]

For each trial a pass key is hidden at a random depth of `--filler` (a held-out document by
default), the document is ingested, and the question is asked with landmark retrieval while
every `RetrievalMemory.select` of the question's memory is recorded. Printed per trial: the
answer, and for the prompt's chunk and each decode step the (layer, KV head) pairs whose
selection holds a block of the key sentence. The summary gives, over trials, the fraction of
pairs holding it at the prompt and at the first four decode steps, and the accuracy. Block
ids are stream ordinals (one stream per trial's store); byte tokens = characters, so the
key sentence's blocks follow from its character offset. Writes nothing.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch

from engine import corpora
from engine.checkpoint import load_model
from engine.inference import TOKENIZER, GenerateConfig, generate, ingest, open_store
from engine.passkey import QUESTION, build_passkey_prompt, parse_answer, passkey_line, prose_filler
from engine.retrieval import RetrievalConfig, RetrievalMemory


def probe(model, text: str, n_tokens: int, trials: int, rc: RetrievalConfig, seed: int = 1, log=print) -> dict:
    L = model.cfg.block_len
    rng = random.Random(seed)
    records: list[tuple[int, list]] = []  # per question forward: (positions, selection per layer)
    orig = RetrievalMemory.select

    def spy(self, layer, q, q_local_pos):
        sel = orig(self, layer, q, q_local_pos)
        if not self.persist:
            if layer == 0:
                records.append((int(q_local_pos.numel()), []))
            records[-1][1].append(sel.tolist())
        return sel

    rows = []
    RetrievalMemory.select = spy
    try:
        for _ in range(trials):
            key = str(rng.randrange(10 ** 4, 10 ** 5))
            depth = rng.random()
            doc, _ = build_passkey_prompt(n_tokens, depth, key, filler=prose_filler(text, n_tokens, rng))
            start = doc.index(passkey_line(key))
            # a block holds L - 1 ordinary tokens and its landmark
            need = set(range(start // (L - 1), (start + len(passkey_line(key)) - 1) // (L - 1) + 1))
            records.clear()
            with torch.no_grad(), tempfile.TemporaryDirectory() as d:
                store = open_store(Path(d) / "store", model.cfg, "w")
                ingest(model, store, "doc", TOKENIZER.encode(doc), retrieval=rc, progress=False)
                ans = TOKENIZER.decode(generate(model, store, TOKENIZER.encode(QUESTION), streams=["doc"],
                                                retrieval=rc, gen=GenerateConfig(max_new_tokens=7)))
                store.close()
            hits = [[(layer, h) for layer, sel in enumerate(sels) for h, row in enumerate(sel) if need & set(row)]
                    for _, sels in records]
            pairs = model.cfg.n_layers * model.cfg.n_kv_heads
            rows.append({"key": key, "depth": round(depth, 3), "answer": ans, "right": parse_answer(ans) == key,
                         "needle_blocks": sorted(need), "hit_fraction": [len(h) / pairs for h in hits]})
            log(f"key {key} depth {depth:.2f} blocks {sorted(need)}: answer {ans!r} "
                f"({'right' if rows[-1]['right'] else 'wrong'})")
            for i, h in enumerate(hits[:5]):
                what = f"prompt ({records[i][0]} positions)" if i == 0 else f"decode step {i}"
                log(f"    {what:<26} pairs (layer, head) holding the key's blocks: {h}")
    finally:
        RetrievalMemory.select = orig
    n = len(rows)
    summary = {"trials": n, "accuracy": sum(r["right"] for r in rows) / n,
               "prompt": sum(r["hit_fraction"][0] for r in rows) / n,
               "decode_1_4": sum(sum(r["hit_fraction"][1:5]) / max(1, len(r["hit_fraction"][1:5])) for r in rows) / n}
    log(f"accuracy {summary['accuracy']:.2f}; (layer, head) pairs holding the key's blocks: prompt "
        f"{summary['prompt']:.2f}, decode steps 1-4 {summary['decode_1_4']:.2f}")
    return {"rows": rows, "summary": summary}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/passkey-tiny-prose")
    ap.add_argument("--filler", default="austen:persuasion", help="a document name or a text file")
    ap.add_argument("--length", type=int, default=32000)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--decode-reselect", type=int, default=1)
    a = ap.parse_args(argv)
    p = Path(a.filler)
    text = p.read_text(encoding="utf-8", errors="replace") if p.is_file() else corpora.load(a.filler)
    probe(load_model(a.model), text, a.length, a.trials, RetrievalConfig(decode_reselect=a.decode_reselect))


if __name__ == "__main__":
    main()
