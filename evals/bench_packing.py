#!/usr/bin/env python3
"""Packed vs unpacked training batches: what packing documents into rows buys, and what the resets cost.

    python3 evals/bench_packing.py            # on the device; writes bench_packing.json to --out (default $OUT)

Documents of 100-2000 tokens (uniform, seeded), rows of 2048, batch 8, bf16, forward + backward of a training step:
  model rows    a hybrid of Llama-3.2-1B's widths (hidden 2048, 32 heads / 8 kv, MLP 8192, vocab 49152) with
                --layers layers, every second one Mamba-3 MIMO R4 in the converted shape (d_state 64, headdim 64,
                ngroups 32, expand 1), sdpa attention:
                  unpacked  one document per row, right padded to 2048 (attention mask, -100 labels)
                  packed    documents packed along the rows, position_ids restarting at each (TRL's padding-free
                            batches): the Mamba-3 layers reset their state inside the kernels, attention gets
                            transformers' block mask from the position_ids
                tokens/s counts real (document) tokens only.
  layer rows    the converted Mamba-3 layer alone at b8 x 2048: the same rows with and without seq_idx (the cost
                of the resets inside the kernels at equal work).
Times are medians of CUDA-event intervals over --reps steps after --warmup; peak memory per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch


def documents(seed: int, lo: int = 100, hi: int = 2000):
    """Document lengths, uniform in [lo, hi], for ever."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield int(torch.randint(lo, hi + 1, (1,), generator=g))


def packed_batch(docs, rows: int, width: int, vocab: int, device) -> dict:
    """Documents laid along `rows` rows of `width` tokens (the one that overflows a row is cut there; TRL's packing
    does the same), position_ids restarting at each document."""
    ids = torch.randint(3, vocab, (rows, width), device=device)
    pos = torch.empty(rows, width, dtype=torch.long)
    r, at = 0, 0
    while r < rows:
        n = min(next(docs), width - at)
        pos[r, at:at + n] = torch.arange(n)
        at += n
        if at == width:
            r, at = r + 1, 0
    labels = ids.clone()
    labels[pos.to(device) == 0] = -100  # a document's first token has no predecessor in it
    return dict(input_ids=ids, position_ids=pos.to(device), labels=labels)


def unpacked_batch(lens: list[int], width: int, vocab: int, device) -> dict:
    ids = torch.randint(3, vocab, (len(lens), width), device=device)
    mask = (torch.arange(width)[None] < torch.tensor(lens)[:, None]).long().to(device)
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def timed(step, warmup: int, reps: int) -> tuple[float, float]:
    """(median ms per call, peak MiB of one call)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        step()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    a = ap.parse_args()
    from transformers import LlamaConfig

    from hybrid_mamba3 import HybridMamba3Config, HybridMamba3ForCausalLM, Mamba3

    dev = torch.device("cuda")
    torch.manual_seed(0)
    llama = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=a.layers,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192)
    mamba = dict(d_state=64, headdim=64, ngroups=32, expand=1, mimo_rank=4, chunk_size=16)
    cfg = HybridMamba3Config.from_llama(llama, "AM" * (a.layers // 2), **mamba)
    model = HybridMamba3ForCausalLM(cfg).to(dev, torch.bfloat16).train()
    model.config._attn_implementation = "sdpa"
    results = dict(gpu=torch.cuda.get_device_name(0), layers=cfg.mixers, batch=a.batch, width=a.width, rows={})

    def train_step(batch):
        def step():
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
        return step

    docs = documents(seed=0)
    lens = [next(docs) for _ in range(a.batch)]
    packed = packed_batch(docs, a.batch, a.width, 49152, dev)
    batches = {"unpacked": (unpacked_batch(lens, a.width, 49152, dev), sum(lens)),
               "packed": (packed, a.batch * a.width)}
    lines = [f"{torch.cuda.get_device_name(0)}, hybrid {''.join('A' if m == 'attention' else 'M' for m in cfg.mixers)}"
             f" (Llama-3.2-1B widths), b{a.batch} x {a.width}, documents of 100-2000 tokens, bf16 fwd+bwd",
             f"{'rows':<28} {'ms/step':>8} {'real tokens':>11} {'tokens/s':>10} {'peak MiB':>9}"]
    for name, (batch, real) in batches.items():
        ms, peak = timed(train_step(batch), a.warmup, a.reps)
        results["rows"][f"model_{name}"] = dict(ms=ms, real_tokens=real, tokens_per_s=real / ms * 1e3, peak_mib=peak)
        lines.append(f"{'model ' + name:<28} {ms:>8.2f} {real:>11} {real / ms * 1e3:>10.0f} {peak:>9.0f}")

    layer = Mamba3(d_model=2048, is_mimo=True, layer_idx=0, **mamba).to(dev, torch.bfloat16)
    u = torch.randn(a.batch, a.width, 2048, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(u)
    seq = (packed["position_ids"] == 0).long().cumsum(1)  # the packed batch's documents
    for name, kw in (("layer, no boundaries", {}), ("layer, seq_idx", dict(seq_idx=seq))):
        def step(kw=kw):
            layer.zero_grad(set_to_none=True)
            u.grad = None
            layer(u, **kw).backward(dy)
        ms, peak = timed(step, a.warmup, a.reps)
        n = a.batch * a.width
        results["rows"][name] = dict(ms=ms, real_tokens=n, tokens_per_s=n / ms * 1e3, peak_mib=peak)
        lines.append(f"{name:<28} {ms:>8.2f} {n:>11} {n / ms * 1e3:>10.0f} {peak:>9.0f}")
    table = "\n".join(lines)
    print(table)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench_packing.json"), "w") as f:
        json.dump(dict(results, table=table), f, indent=1)


if __name__ == "__main__":
    main()
