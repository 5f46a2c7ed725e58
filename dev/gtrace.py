#!/usr/bin/env python3
"""dev/gtrace.py - sums the in-graph timeline of one decode step.

Input: the file a CU_GTRACE build writes for DS4_CUDA_GTRACE=N (cuda.cuh):
one line per logged block (the first and the last block of every kernel
of the N-th step graph replay): file line last nblk smid t_pre t_post
t_exit, times in ns of %globaltimer. t_pre: the block started; t_post:
its cu_pdl_wait returned (the previous kernel on its stream had finished);
t_exit: it left the wait's scope (for a wait at the top of a kernel, its
end).

Output: the step's span, the time no logged kernel was running, and per
kernel (named by the __global__ or __device__ function around the wait's
line in src/cuda) the calls, the time from its data being ready (first
block's t_post) to its end (the later exit of its first and last block),
and how long its blocks sat resident before that (PDL).

usage: python3 dev/gtrace.py GTRACE.txt [--src src/cuda] [--timeline]
"""
import argparse
import os
import re
import sys
from collections import defaultdict

FUNC = re.compile(r"^\s*(?:template\s*<[^>]*>\s*)?(?:static\s+)?(?:__global__|__device__)\b(.*)")
NAME = re.compile(r"\b(\w+)\s*\(")


def site_names(src):
    """(file basename[:15], line) -> the function whose body holds that line"""
    names = {}
    for fn in os.listdir(src):
        if not fn.endswith((".cu", ".cuh")):
            continue
        cur = "?"
        with open(os.path.join(src, fn), encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                m = FUNC.match(line)
                if m:
                    rest = re.sub(r"__launch_bounds__\s*\([^)]*\)", "", m.group(1))
                    n = NAME.search(rest)
                    if n:
                        cur = n.group(1)
                names[(fn[:15], i)] = cur
    return names


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--src", default=os.path.join(os.path.dirname(__file__), "..", "src", "cuda"))
    ap.add_argument("--timeline", action="store_true", help="print every kernel in start order")
    a = ap.parse_args()
    names = site_names(a.src)
    recs = []
    with open(a.trace, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            p = line.split()
            file, ln, last, nblk, smid, t_pre, t_post, t_exit = p[0], int(p[1]), int(p[2]), int(p[3]), int(p[4]), int(p[5]), int(p[6]), int(p[7])
            nm = names.get((file, ln), "%s:%d" % (file, ln))
            recs.append(dict(name=nm, site=(file, ln), last=last, nblk=nblk, pre=t_pre, post=t_post, exit=t_exit))
    if not recs:
        sys.exit("no records")
    t0 = min(r["pre"] for r in recs)
    firsts = sorted((r for r in recs if not r["last"]), key=lambda r: r["pre"])
    lasts = [r for r in recs if r["last"]]
    # pair each first block with the last block of the same launch: the
    # same site and grid, the nearest last-block record that started after it
    # (a last block that returns before its wait logs nothing: a launch
    # without one keeps its first block's exit as its end)
    by_site = defaultdict(list)
    for r in lasts:
        by_site[(r["site"], r["nblk"])].append(r)
    firsts_of = defaultdict(list)
    for r in firsts:
        firsts_of[(r["site"], r["nblk"])].append(r)
    insts = []
    for key, fs in firsts_of.items():
        ls = sorted(by_site[key], key=lambda r: r["pre"])
        for k, r in enumerate(fs):
            # the last block of the same launch: the nearest one in time (it
            # may start before the first block), nearer than the neighbour launches
            prv = fs[k - 1]["pre"] if k else -float("inf")
            nxt = fs[k + 1]["pre"] if k + 1 < len(fs) else float("inf")
            lo, hi = (prv + r["pre"]) / 2, (r["pre"] + nxt) / 2
            cand = sorted((l for l in ls if lo <= l["pre"] < hi), key=lambda l: abs(l["pre"] - r["pre"])) if r["nblk"] > 1 else []
            end, lpre = r["exit"], None
            if cand:
                end = max(end, cand[0]["exit"])
                lpre = cand[0]["pre"]
            insts.append(dict(name=r["name"], nblk=r["nblk"], pre=r["pre"], post=r["post"], end=end, lpre=lpre))
    insts.sort(key=lambda x: x["post"])
    span = max(x["end"] for x in insts) - t0
    # idle: time covered by no kernel's [post, end]
    busy = 0
    cur_s = cur_e = None
    for x in sorted(insts, key=lambda x: x["post"]):
        if cur_e is None or x["post"] > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = x["post"], x["end"]
        else:
            cur_e = max(cur_e, x["end"])
    busy += cur_e - cur_s
    print("kernels %d, step span %.1f us, some kernel running (after its wait) %.1f us, none %.1f us"
          % (len(insts), span / 1e3, busy / 1e3, (span - busy) / 1e3))
    # critical-path share: a kernel is charged the time from its data being
    # ready to the next kernel's data being ready (start order), so the
    # charges add up to the step; side-stream kernels overlap and take
    # their share of what ran meanwhile
    agg = defaultdict(lambda: [0, 0.0, 0.0, 0.0, 0])
    for i, x in enumerate(insts):
        nxt = insts[i + 1]["post"] if i + 1 < len(insts) else x["end"]
        g = agg[x["name"]]
        g[0] += 1
        g[1] += x["end"] - x["post"]
        g[2] += nxt - x["post"]
        g[3] += x["post"] - x["pre"]
        g[4] = max(g[4], x["nblk"])
    tot = sum(g[2] for g in agg.values())
    print("%-28s %6s %6s %10s %9s %10s %7s %10s" % ("kernel", "calls", "blocks", "run us", "us/call", "chain us", "share", "resident"))
    for nm, g in sorted(agg.items(), key=lambda kv: -kv[1][2]):
        print("%-28s %6d %6d %10.1f %9.2f %10.1f %6.1f%% %10.1f"
              % (nm[:28], g[0], g[4], g[1] / 1e3, g[1] / 1e3 / g[0], g[2] / 1e3, 100 * g[2] / tot, g[3] / 1e3))
    if a.timeline:
        print("\n%10s %8s %8s %8s %7s  %s" % ("post us", "run", "resid", "tail", "blocks", "kernel"))
        for x in insts:
            tail = (x["end"] - x["lpre"]) / 1e3 if x["lpre"] is not None else 0.0
            print("%10.2f %8.2f %8.2f %8.2f %7d  %s" % ((x["post"] - t0) / 1e3, (x["end"] - x["post"]) / 1e3,
                                                     (x["post"] - x["pre"]) / 1e3, tail, x["nblk"], x["name"]))


if __name__ == "__main__":
    main()
