"""Does a question's block selection include the needle's block? Search rules compared on a
TRAINING text (austen:emma; never the held-out one), SmolLM2, one ingest per trial.

    python -m bench.selection_probe [N_TOKENS]   (default 8000)

For each trial a pass-key sentence is hidden at a depth, the haystack ingested, the question's
queries recorded per layer, and every rule scores the stored blocks (sinks and the local window
excluded) from the stored pre-RoPE keys: which fraction of layers (any KV head) and of (layer,
KV head) pairs put the needle's block in their top 8. Rules: max or mean over the question's
queries (and query heads), of the block's mean key, of its best key (max_k), or of a
logsumexp over its keys, of the mean of its 4 best keys (top4_k), or of Quest's upper bound
(arXiv 2406.10774: per channel the block's min/max key, q . centre + |q| . half-range);
`rot1024`: the query rotated to distance 1024 first. The `global` rows: one selection shared by
every layer (z-scores summed or maxed over all (layer, KV head) pairs, or their top-8 votes):
1 when the needle's block is in that top 8.
"""
import torch, shutil, sys, json, random
from engine.commands import load_model_arg
from engine.inference import ingest, open_store, chat_document, question_tokens, CHAT_META
from engine.training_free import TrainingFreeConfig, TrainingFreeMemory
from engine.model import apply_rope, rope_cos_sin
from engine import corpora
torch.set_grad_enabled(False)
model, tok = load_model_arg("models/smollm2-135m")
text = corpora.load("austen:emma")
N = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
res = []
for trial, depth in enumerate([0.1, 0.3, 0.5, 0.7, 0.9]):
    rng = random.Random(trial)
    start = rng.randrange(0, len(text) - 60000)
    hay = text[start:start + N * 5]
    key = str(rng.randrange(10**5, 10**6))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    ids_h = tok.encode(hay)[:N]
    cut = int(len(ids_h) * depth)
    pre = chat_document(tok, "")  # the turn's opening
    ids = pre + ids_h[:cut] + tok.encode(needle) + ids_h[cut:]
    npos = len(pre) + cut
    nblocks = {npos // 64, (npos + len(tok.encode(needle)) - 1) // 64}
    shutil.rmtree("/tmp/diagst", ignore_errors=True)
    store = open_store("/tmp/diagst", model.cfg, "a")
    ingest(model, store, "doc", ids, tokenizer=tok, meta_update={CHAT_META: True})
    qids = question_tokens(tok, "What is the pass key?", chat=True, continues_turn=True)
    rec = {}
    class Probe(TrainingFreeMemory):
        def attend(self, layer, q, k, v):
            rec[layer] = q.clone()
            return super().attend(layer, q, k, v)
    mem = Probe(model.cfg, store, stream=None, persist=False, read_streams=["doc"])
    mem.resume_from_store("doc")
    tail = store.get_stream_meta("doc").get("tail", [])
    model(torch.tensor([tail + qids]), memory=mem)
    bids = store.stream_blocks("doc")
    excl = set(mem.sink_ids) | set(mem.window.stored_ids())
    cand = [i for i in bids.tolist() if i not in excl]
    target = {int(bids[b]) for b in nblocks if b < len(bids)} & set(cand)
    if not target:
        print("needle in local/sink", depth); continue
    out = {}
    glob = {}  # rule -> per layer (Hkv, n) z-scored block scores, for the cross-layer rules
    for layer in range(model.cfg.n_layers):
        K, _ = store.get_layer(cand, layer)  # (n, Hkv, L, D)
        K = K.float()
        q = rec[layer][0, :, len(tail):].float()  # (H, T, D) question part only
        H, T, D = q.shape; Hkv = K.shape[1]; G = H // Hkv
        qg = q.reshape(Hkv, G * T, D)
        kmean = K.mean(2)  # (n, Hkv, D)
        s_mean = torch.einsum("hqd,nhd->hqn", qg, kmean)  # (Hkv, GT, n)
        # exact: max over the block's keys of the score at their relative rotation ~ ignoring rope
        s_all = torch.einsum("hqd,nhld->hqnl", qg, K)  # (Hkv, GT, n, L)
        cos, sin = rope_cos_sin(torch.tensor([1024]), D, model.cfg.rope)
        qr = apply_rope(qg, cos, sin)
        s_rot = torch.einsum("hqd,nhd->hqn", qr, kmean)
        s_allrot = torch.einsum("hqd,nhld->hqnl", qr, K)  # (Hkv, GT, n, L)
        centre, half = (K.amax(2) + K.amin(2)) / 2, (K.amax(2) - K.amin(2)) / 2  # (n, Hkv, D)
        s_quest = (torch.einsum("hqd,nhd->hqn", qr, centre) + torch.einsum("hqd,nhd->hqn", qr.abs(), half))
        variants = {"max_q mean_k": s_mean.amax(1), "mean_q mean_k": s_mean.mean(1),
                    "mean_q max_k rot1024": s_allrot.amax(3).mean(1),
                    "mean_q top4_k rot1024": s_allrot.topk(4, dim=3).values.mean(3).mean(1),
                    "mean_q quest rot1024": s_quest.mean(1), "max_q quest rot1024": s_quest.amax(1),
                    "max_q max_k": s_all.amax(3).amax(1), "mean_q max_k": s_all.amax(3).mean(1),
                    "mean_q lse_k": torch.logsumexp(s_all / D**0.5, 3).mean(1),
                    "max_q mean_k rot1024": s_rot.amax(1), "mean_q mean_k rot1024": s_rot.mean(1)}
        ti = [cand.index(t) for t in target]
        for name, sc in variants.items():
            z = (sc - sc.mean(-1, keepdim=True)) / sc.std(-1, keepdim=True).clamp(min=1e-6)  # (Hkv, n)
            glob.setdefault(name, []).append(z)
            top = sc.topk(8, dim=-1).indices  # (Hkv, 8)
            hit = [bool(any(t in top[h].tolist() for t in ti)) for h in range(Hkv)]
            out.setdefault(name, []).append(hit)
    summ = {n: (sum(any(h) for h in v) / len(v), sum(sum(h) for h in v) / (len(v) * len(v[0]))) for n, v in out.items()}
    # one selection shared by every layer: the needle's block in the top 8 of the z-scores summed
    # (or maxed) over all (layer, KV head) pairs, or of the votes of their top-8 lists (1 / 0)
    for name in ("mean_q mean_k rot1024", "max_q mean_k rot1024", "mean_q max_k rot1024"):
        zs = torch.stack(glob[name])  # (layers, Hkv, n)
        votes = torch.zeros(zs.shape[-1])
        for t in zs.reshape(-1, zs.shape[-1]).topk(8, dim=-1).indices:
            votes[t] += 1
        for agg, g in (("sum_z", zs.sum((0, 1))), ("max_z", zs.amax((0, 1))), ("votes", votes)):
            top = g.topk(8).indices.tolist()
            summ[f"global {agg} {name}"] = (float(any(t in top for t in ti)), float("nan"))
    res.append(summ)
    print(depth, {n: f"{a:.2f}/{b:.2f}" for n, (a, b) in summ.items()}, flush=True)
    store.close()
print("mean over trials (layers with any head hitting / (layer,head) hit rate):")
for n in res[0]:
    print(f"  {n:24s} {sum(r[n][0] for r in res)/len(res):.2f} {sum(r[n][1] for r in res)/len(res):.2f}")
