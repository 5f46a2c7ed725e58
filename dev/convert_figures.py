#!/usr/bin/env python3
"""convert_figures.py - figures of ds4-convert for issue 11's note (dev/convert_figures.md has the commands run
and the numbers they gave). Run with the project's .venv (gguf-py, numpy); it imports the test-side generator
and helpers of tests/py (official_ckpt.py, oracle_util.py), written from the spec independently of the C code.

  error CKPT GGUF [--weights DAT] [--max-experts N]
      Quantization error per tensor class of GGUF, converted by ds4-convert from the official-format checkpoint
      CKPT: for every matrix of the main file, against the official dequantization of CKPT's bytes (FP8 E4M3 x
      ue8m0 128x128 tiles, FP4 E2M1 x ue8m0 per 32, BF16, F32), the relative RMSE
          ||q - x|| / ||x||                         (summed over the class: sqrt(sum (q-x)^2 / sum x^2))
      and, with --weights DAT (a llama.cpp legacy .dat importance matrix, e.g. from ds4 --imatrix-out), for the
      tensors DAT covers (routed experts: per expert, per input column c) the importance-weighted relative RMSE
          sqrt(sum_c w_c (q-x)^2 / sum_c w_c x^2).
      A class is a GGUF name without its "blk.N." prefix (and the output type). Prints a Markdown table. Row
      blocks of 8192 rows keep memory at a few hundred MiB for any tensor. --max-experts: only the first N
      experts of each stack (time).

  synth-imatrix GGUF OUT.dat [--sigma S] [--seed N]
      A legacy .dat with an entry for every routed-expert stack of GGUF (blk.N.ffn_{gate,up,down}_exps.weight,
      per expert, ncall 1) drawn log-normal(0, S^2) per input column: importance that varies by orders of
      magnitude between channels, as in trained LLMs (the synthetic models' own activations, collected by ds4
      --imatrix-out, are nearly isotropic), to show what --imatrix does where it matters.

  kl [--calib N] [--keep DIR]
      KL(f32 || recipe) of the next-token distributions on the sharpened oracle fixture (tests/data/oracle,
      h256_sharp_96: 96 tokens, a trained-LM-like sharp output), as test_convert_official.py's
      test_recipe_kl_vs_f32_on_sharp_fixture does: the fixture's model written as an official-format checkpoint
      (official_ckpt.make), converted to f32, q8_0, q4 and q2, and also q4 and q2 with an importance matrix that
      ds4 --imatrix-out collected on the f32 file from N random tokens (seed 5, not the evaluation tokens); each
      file run by ds4 --cpu --plain-numerics --dump-logits over the 96 tokens. Prints mean KL, max KL and the
      top-1 agreement with f32 per file.
"""
import argparse
import json
import mmap
import pathlib
import re
import struct
import subprocess
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "py"))

import gguf  # noqa: E402

import official_ckpt as oc  # noqa: E402
from oracle_util import EXPERT, LAYER, ORACLE  # noqa: E402

GLOBAL = {"embed.weight": "token_embd.weight", "head.weight": "output.weight", "hc_head_fn": "output_hc_fn.weight"}
LAYER_ALIASES = dict(LAYER, **{"attn.kv_norm.weight": "attn_kv_a_norm.weight"})
ROWS = 8192


# ---------------------------------------------------------------- checkpoint side

class Checkpoint:
    """The safetensors shards of an official-format checkpoint, read lazily (mmap)."""

    def __init__(self, d):
        self.t = {}
        self.maps = []
        for p in sorted(pathlib.Path(d).glob("*.safetensors")):
            f = open(p, "rb")
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self.maps.append((f, m))
            (n,) = struct.unpack("<Q", m[:8])
            for name, info in json.loads(m[8:8 + n]).items():
                if name != "__metadata__":
                    self.t[name] = (m, 8 + n, info)

    def raw(self, name):
        m, base, info = self.t[name]
        b, e = info["data_offsets"]
        dt = oc.ST_NP[info["dtype"]]
        return info["dtype"], np.frombuffer(m, dtype=dt, count=(e - b) // np.dtype(dt).itemsize,
                                            offset=base + b).reshape(info["shape"])

    def rows(self, name, r0, r1):
        """Rows [r0, r1) of a 2-D weight, dequantized as the official kernels do (float32)."""
        dt, a = self.raw(name)
        if dt == "F8_E4M3":
            _, sc = self.raw(name[:-len(".weight")] + ".scale")
            assert r0 % 128 == 0
            return oc.fp8_dequant(a[r0:r1], sc[r0 // 128:(r1 + 127) // 128])
        if dt in ("I8", "U8"):
            _, sc = self.raw(name[:-len(".weight")] + ".scale")
            return oc.fp4_dequant(a[r0:r1], sc[r0:r1])
        if dt == "BF16":
            return (a[r0:r1].astype(np.uint32) << 16).view(np.float32)
        return a[r0:r1].astype(np.float32)

    def n_rows(self, name):
        return self.t[name][2]["shape"][0]


def sources(ck):
    """{gguf name: [official name of matrix m]} for the main file's matrices (2-D sources; experts stacked)."""
    out, experts = {}, {}
    for n, (_, _, info) in ck.t.items():
        if len(info["shape"]) != 2 or n.endswith(".scale") or n.startswith("mtp."):
            continue
        if n in GLOBAL:
            out[GLOBAL[n]] = [n]
            continue
        m = re.match(r"layers\.(\d+)\.(.*)$", n)
        if not m:
            continue
        il, suf = int(m.group(1)), m.group(2)
        e = re.match(r"ffn\.experts\.(\d+)\.(w[123])\.weight$", suf)
        if e:
            experts.setdefault(f"blk.{il}.{EXPERT[e.group(2)]}", {})[int(e.group(1))] = n
        elif suf in LAYER_ALIASES and not suf.endswith("tid2eid"):
            out[f"blk.{il}.{LAYER_ALIASES[suf]}"] = [n]
    for g, d in experts.items():
        out[g] = [d[i] for i in range(len(d))]
    return out


def read_dat(path):
    """llama.cpp legacy imatrix (docs/FORMATS.md C.7): {name: values / ncall}."""
    b = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack_from("<i", b, 0)
    off, out = 4, {}
    for _ in range(n):
        (ln,) = struct.unpack_from("<i", b, off)
        name = b[off + 4:off + 4 + ln].decode()
        off += 4 + ln
        ncall, nval = struct.unpack_from("<ii", b, off)
        off += 8
        out[name] = np.frombuffer(b, "<f4", nval, off).astype(np.float64) / max(ncall, 1)
        off += 4 * nval
    return out


def cmd_error(a):
    ck = Checkpoint(a.ckpt)
    src = sources(ck)
    imat = read_dat(a.weights) if a.weights else {}
    r = gguf.GGUFReader(a.gguf)
    acc = {}
    for t in r.tensors:
        if t.name not in src:
            continue
        names = src[t.name]
        if a.max_experts and len(names) > 1:
            names = names[:a.max_experts]
        cls = (re.sub(r"^blk\.\d+\.", "", t.name), t.tensor_type.name)
        s = acc.setdefault(cls, {"sse": 0.0, "ssx": 0.0, "wsse": 0.0, "wssx": 0.0, "n": 0, "ne": list(t.shape),
                                 "weighted": False})
        data = np.asarray(t.data)
        w_all = imat.get(t.name)
        n_in = int(t.shape[0])
        for m, name in enumerate(names):
            w = None
            if w_all is not None:
                w = w_all[m * n_in:(m + 1) * n_in] if len(w_all) >= (m + 1) * n_in and len(names) > 1 else \
                    w_all[:n_in]
                s["weighted"] = True
            slab = data[m] if len(data.shape) == 3 else data
            for r0 in range(0, ck.n_rows(name), ROWS):
                r1 = min(r0 + ROWS, ck.n_rows(name))
                x = ck.rows(name, r0, r1).astype(np.float64)
                q = gguf.quants.dequantize(np.asarray(slab[r0:r1]), t.tensor_type).reshape(x.shape).astype(np.float64)
                d2, x2 = (q - x) ** 2, x ** 2
                s["sse"] += d2.sum()
                s["ssx"] += x2.sum()
                if w is not None:
                    s["wsse"] += (d2 * w).sum()
                    s["wssx"] += (x2 * w).sum()
            s["n"] += 1
    print(f"| class | type | GGUF ne | matrices | rel RMSE | imatrix-weighted rel RMSE |")
    print("|---|---|---|---|---|---|")
    for (cls, ty), s in sorted(acc.items()):
        rel = np.sqrt(s["sse"] / s["ssx"]) if s["ssx"] else 0.0
        wr = f"{np.sqrt(s['wsse'] / s['wssx']):.4g}" if s['weighted'] else "-"
        print(f"| {cls} | {ty} | {'x'.join(str(int(v)) for v in s['ne'])} | {s['n']} | {rel:.4g} | {wr} |")


def cmd_synth_imatrix(a):
    r = gguf.GGUFReader(a.gguf)
    rng = np.random.default_rng(a.seed)
    ents = [(t.name, int(t.shape[0]) * int(t.shape[2])) for t in r.tensors if re.search(r"_exps\.weight$", t.name)]
    with open(a.out, "wb") as f:
        f.write(struct.pack("<i", len(ents)))
        for name, n in ents:
            b = name.encode()
            f.write(struct.pack("<i", len(b)) + b + struct.pack("<ii", 1, n))
            f.write(np.exp(a.sigma * rng.standard_normal(n)).astype("<f4").tobytes())
        ds = b"synthetic log-normal"
        f.write(struct.pack("<ii", 1, len(ds)) + ds)


# ---------------------------------------------------------------- KL on the sharp fixture

def run(cmd):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=1200)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(map(str, cmd))}\n{r.stderr}")
    return r


def cmd_kl(a):
    tmp = pathlib.Path(a.keep) if a.keep else pathlib.Path(tempfile.mkdtemp(prefix="ds4-kl-"))
    tmp.mkdir(parents=True, exist_ok=True)
    ck = tmp / "sharp"
    oc.make(ORACLE / "models" / "h256_sharp", ck)
    tokens = ORACLE / "h256_sharp_96" / "tokens.txt"
    n_tok = len(tokens.read_text().split())
    conv, ds4 = ROOT / "ds4-convert", ROOT / "ds4"
    run([conv, "--hf", ck, "-o", tmp / "f32.gguf", "--recipe", "f32"])
    vocab = json.loads((ORACLE / "models" / "h256_sharp" / "config.json").read_text())["vocab_size"]
    calib = tmp / "calib.txt"
    calib.write_text(" ".join(map(str, np.random.default_rng(5).integers(0, vocab, a.calib))))
    dat = tmp / "sharp.dat"
    run([ds4, "-m", tmp / "f32.gguf", "--cpu", "-c", a.calib, "--prompt-tokens-file", calib, "--imatrix-out", dat])
    files = {"f32": [], "q8_0": [], "q4": [], "q2": [], "q4+imatrix": ["--imatrix", dat],
             "q2+imatrix": ["--imatrix", dat]}
    logits = {}
    for key, extra in files.items():
        g = tmp / f"{key}.gguf"
        if key != "f32":
            run([conv, "--hf", ck, "-o", g, "--recipe", key.split("+")[0], *extra])
        out = tmp / f"{key}.f32"
        run([ds4, "-m", g, "--cpu", "--plain-numerics", "--prompt-tokens-file", tokens, "--dump-logits", out])
        logits[key] = np.fromfile(out, dtype="<f4").reshape(n_tok, -1).astype(np.float64)

    def logp(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    ref = logp(logits["f32"])
    print(f"imatrix: ds4 --imatrix-out on f32.gguf, {a.calib} random tokens (seed 5); files in {tmp}")
    print("| file | mean KL(f32 \\|\\| file) | max KL | top-1 agreement |")
    print("|---|---|---|---|")
    for key in files:
        if key == "f32":
            continue
        q = logp(logits[key])
        kl = np.sum(np.exp(ref) * (ref - q), axis=1)
        top1 = np.mean(ref.argmax(1) == q.argmax(1))
        print(f"| {key} | {kl.mean():.5f} | {kl.max():.5f} | {100 * top1:.1f}% ({int(round(top1 * n_tok))}/{n_tok}) |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("error")
    e.add_argument("ckpt")
    e.add_argument("gguf")
    e.add_argument("--weights")
    e.add_argument("--max-experts", type=int, default=0)
    si = sub.add_parser("synth-imatrix")
    si.add_argument("gguf")
    si.add_argument("out")
    si.add_argument("--sigma", type=float, default=1.5)
    si.add_argument("--seed", type=int, default=1)
    k = sub.add_parser("kl")
    k.add_argument("--calib", type=int, default=512)
    k.add_argument("--keep")
    a = p.parse_args()
    {"error": cmd_error, "synth-imatrix": cmd_synth_imatrix, "kl": cmd_kl}[a.cmd](a)


if __name__ == "__main__":
    main()
