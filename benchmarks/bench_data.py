"""Throughput of the data pipeline: preparation (MB/s of text) and the train loader (tokens/s).

    python benchmarks/bench_data.py                       # builtin corpus, default config
    python benchmarks/bench_data.py --max-chars 100000 --steps 500

Preparation runs in a fresh temporary cache (cold), then again in the same cache (warm). The loader
must be far faster than training: a CPU step of a small model consumes ~1e4-1e5 tokens/s, a GPU
step ~1e6; the ratio printed last is loader tokens/s over 1e6.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from moe.data import DataConfig, prepare_data
from moe.data.sources import load_corpus
from moe.data.tokenizer import BPETokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-chars", type=int, default=DataConfig().max_chars_per_domain, help="chars per domain")
    ap.add_argument("--vocab-size", type=int, default=DataConfig().vocab_size)
    ap.add_argument("--seq-len", type=int, default=DataConfig().seq_len)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2000, help="loader batches to time")
    args = ap.parse_args()
    cfg = DataConfig(max_chars_per_domain=args.max_chars, vocab_size=args.vocab_size, seq_len=args.seq_len)

    t0 = time.perf_counter()
    corpus = load_corpus(cfg)
    t_corpus = time.perf_counter() - t0
    texts = [d.text for d in corpus.documents]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    t0 = time.perf_counter()
    tok = BPETokenizer.train(texts, cfg.vocab_size)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    t_encode = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        data = prepare_data(cfg, seed=0, cache_dir=cache)
        t_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        prepare_data(cfg, seed=0, cache_dir=cache)
        t_warm = time.perf_counter() - t0

    stream = data.train_stream(micro_batch_size=args.micro_batch)
    next(stream)  # builds the first epoch's layout
    t0 = time.perf_counter()
    tokens = sum(next(stream).num_tokens for _ in range(args.steps))
    t_loader = time.perf_counter() - t0
    t0 = time.perf_counter()
    val = data.val_batches(batch_size=args.micro_batch)
    t_val = time.perf_counter() - t0

    print(
        f"corpus: {mb:.2f} MB of text, {len(texts)} documents, {n_tokens} tokens "
        f"({mb * 1e6 / n_tokens:.2f} bytes/token, vocab {tok.vocab_size})"
    )
    print(f"{'domain':<8} {'bytes':>9} {'docs':>5} {'tokens':>8} {'undecodable':>11} {'truncated':>9}")
    for name, info in data.manifest["domains"].items():
        split = data.manifest["split"][name]
        print(
            f"{name:<8} {info['bytes']:>9} {info['documents']:>5} "
            f"{split['train_tokens'] + split['val_tokens']:>8} {info['undecodable_bytes']:>11} "
            f"{info['truncated_documents']:>9}"
        )
    print(f"assemble corpus   {t_corpus:7.2f} s  {mb / t_corpus:8.1f} MB/s")
    print(f"train BPE (all)   {t_train:7.2f} s  {mb / t_train:8.1f} MB/s")
    print(f"encode_batch      {t_encode:7.2f} s  {mb / t_encode:8.1f} MB/s")
    print(f"prepare (cold)    {t_cold:7.2f} s  {mb / t_cold:8.1f} MB/s tokenized end to end")
    print(f"prepare (cached)  {t_warm:7.2f} s")
    print(
        f"loader            {tokens / t_loader:12.3e} tokens/s  ({args.steps} batches of "
        f"[{args.micro_batch}, {cfg.seq_len}]; ratio to 1e6 tokens/s: {tokens / t_loader / 1e6:.1f}x)"
    )
    print(f"val batches       {t_val * 1e3:7.1f} ms for {len(val)} batches ({sum(b.num_tokens for b in val)} tokens)")
    shares = np.zeros(len(data.domains))
    for _ in range(200):
        shares += np.bincount(next(stream).domain.numpy().ravel(), minlength=len(data.domains))
    print(
        "train token share per domain (balanced mixture):",
        ", ".join(f"{n}={s:.3f}" for n, s in zip(data.domains, shares / shares.sum())),
    )


if __name__ == "__main__":
    main()
