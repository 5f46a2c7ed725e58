#!/usr/bin/env python3
"""HF `tokenizers` throughput on the same job as dev/tok_bench.c: encode the
whole text (add_special_tokens=False) single-threaded, best of N, MB = 1e6
bytes. Run with RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false:

  RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false .venv/bin/python \
      dev/tok_bench_hf.py tests/data/deepseek-v3-tokenizer.json tests/data/promessi_sposi.txt
"""
import os
import sys
import time

from tokenizers import Tokenizer


def main():
    if os.environ.get("RAYON_NUM_THREADS") != "1":
        print("warning: RAYON_NUM_THREADS is not 1", file=sys.stderr)
    tok = Tokenizer.from_file(sys.argv[1])
    data = open(sys.argv[2], "rb").read()
    text = data.decode("utf-8")
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    best, n = 1e30, 0
    for _ in range(reps):
        t0 = time.perf_counter()
        n = len(tok.encode(text, add_special_tokens=False).ids)
        best = min(best, time.perf_counter() - t0)
    print("%d bytes -> %d tokens; best of %d: %.4f s = %.2f MB/s"
          % (len(data), n, reps, best, len(data) / best / 1e6))


if __name__ == "__main__":
    main()
