"""MTP speculative decoding from the command line (issue 10, docs/MODEL.md C.12, FORMATS.md D.3).

- A random MTP GGUF (the 32 `mtp.0.*` tensors, shapes taken from the main file) is written here with gguf-py.
- Greedy output with `--mtp` is token for token the greedy output without it on every oracle fixture (plain and
  release numerics; the random block's drafts are mostly rejected, so every rejection path runs).
- The MTP block itself against an independent float64 NumPy implementation of C.12 written from MODEL.md
  (build/dev/mtp_dump gives the main model's states h_i and the block's logits and output states for the pairs
  (h_i, t_{i+1}) in order, through the block's own sliding window).
- Bad MTP files and options fail with messages naming the tensor / option; the CLI's final line carries the MTP
  counters.
"""
import json
import subprocess

import numpy as np
import pytest

from conftest import ROOT, prog
from oracle_util import ORACLE, convert

FIXTURES = sorted(p.parent.name for p in ORACLE.glob("*/meta.json"))

BLOCK = ["hc_attn_fn.weight", "hc_attn_scale.weight", "hc_attn_base.weight", "attn_norm.weight",
         "attn_q_a.weight", "attn_q_a_norm.weight", "attn_q_b.weight", "attn_kv.weight", "attn_kv_a_norm.weight",
         "attn_sinks.weight", "attn_output_a.weight", "attn_output_b.weight", "hc_ffn_fn.weight",
         "hc_ffn_scale.weight", "hc_ffn_base.weight", "ffn_norm.weight", "ffn_gate_inp.weight",
         "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight", "ffn_gate_shexp.weight",
         "ffn_up_shexp.weight", "ffn_down_shexp.weight"]


def read_gguf(path):
    """(fields {key: value}, tensors {name: float64 array in numpy order (reversed ne)})."""
    import gguf
    r = gguf.GGUFReader(str(path))
    fields = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        try:
            fields[k] = f.contents()
        except Exception:  # noqa: BLE001 - fields we do not need
            pass
    tens = {}
    for t in r.tensors:
        a = gguf.quants.dequantize(np.array(t.data), t.tensor_type) if t.tensor_type not in (
            gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.I32) else np.array(t.data)
        shape = [int(x) for x in reversed(t.shape.tolist())]
        tens[t.name] = np.asarray(a).reshape(shape).astype(np.float64 if t.tensor_type !=
                                                             gguf.GGMLQuantizationType.I32 else np.int64)
    return fields, tens


def make_mtp(main, out, seed=1, drop=(), bad_shape=None, arch="deepseek4", extra=()):
    """A random MTP GGUF for the model in `main` (all F32), shapes from main's last block."""
    import gguf
    fields, t = read_gguf(main)
    nl = int(fields["deepseek4.block_count"])
    n_hc = int(fields["deepseek4.hyper_connection.count"])
    D = t["token_embd.weight"].shape[1]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(out), arch)
    arrays = {}
    for s in BLOCK:
        shape = t[f"blk.{nl - 1}.{s}"].shape
        if "norm" in s or s.endswith("scale.weight"):
            a = 1 + rng.uniform(-0.2, 0.2, shape)
        elif "base" in s:
            a = rng.normal(0, 0.5, shape)
        elif "sinks" in s:
            a = rng.normal(0, 1, shape)
        else:
            fan_in = shape[-1]
            a = rng.normal(0, 1 / np.sqrt(fan_in), shape)
            if "down" in s or "output_b" in s:
                a *= 0.3
            if "gate_inp" in s:
                a *= 4
        arrays["mtp.0." + s] = a
    E = t[f"blk.{nl - 1}.ffn_gate_inp.weight"].shape[0]
    arrays["mtp.0.exp_probs_b.bias"] = rng.normal(0, 0.2, (E,))
    arrays["mtp.0.e_proj.weight"] = rng.normal(0, 1 / np.sqrt(D), (D, D))
    arrays["mtp.0.h_proj.weight"] = rng.normal(0, 1 / np.sqrt(D), (D, D))
    for s in ("enorm", "hnorm", "norm"):
        arrays[f"mtp.0.{s}.weight"] = 1 + rng.uniform(-0.2, 0.2, (D,))
    arrays["mtp.0.hc_head_fn.weight"] = rng.normal(0, 1 / np.sqrt(n_hc * D), (n_hc, n_hc * D))
    arrays["mtp.0.hc_head_base.weight"] = rng.normal(0, 0.5, (n_hc,))
    arrays["mtp.0.hc_head_scale.weight"] = 1 + rng.uniform(-0.2, 0.2, (1,))
    assert len(arrays) == 32
    for name in extra:  # tensors that are not the block's
        arrays[name] = np.ones(8)
    for name, a in arrays.items():
        if name in drop:
            continue
        if name == bad_shape:
            a = np.concatenate([a, a[:1]])
        w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """get(model) -> (main f32 GGUF, random MTP GGUF)."""
    d = tmp_path_factory.mktemp("mtp")
    cache = {}

    def get(model):
        if model not in cache:
            p = d / f"{model}.gguf"
            r = convert(ORACLE / "models" / model, p, "f32")
            assert r.returncode == 0, r.stderr
            cache[model] = (p, make_mtp(p, d / f"{model}-mtp.gguf", seed=len(cache) + 3,
                                                   arch="deepseek4_mtp_support"))
        return cache[model]
    return get


def greedy(model, fx, out, release, n, mtp=None, extra=()):
    cmd = [prog("ds4"), "-m", str(model), "--cpu", "--prompt-tokens-file", str(ORACLE / fx / "tokens.txt"),
           "--dump-logits", str(out), "--dump-greedy", str(n), *extra]
    if not release:
        cmd.append("--plain-numerics")
    if mtp:
        cmd += ["--mtp", str(mtp)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"
    line = [x for x in r.stdout.splitlines() if x.startswith("greedy:")][0]
    return [int(v) for v in line.split()[1:]], r.stderr


@pytest.mark.parametrize("fx", FIXTURES)
def test_mtp_greedy_equals_plain_greedy_on_oracle_fixtures(fx, models, tmp_path):
    m = json.loads((ORACLE / fx / "meta.json").read_text())
    main, mtp = models(m["model"])
    ref, _ = greedy(main, fx, tmp_path / "a.f32", m["release"], 24)
    for nd in (1, 3, 4):
        got, err = greedy(main, fx, tmp_path / "b.f32", m["release"], 24, mtp,
                          ("--mtp-draft", str(nd), "--mtp-gate", "0"))
        stats = [x for x in err.splitlines() if "ds4: mtp:" in x]
        print(f"{fx} n_draft {nd}: {stats[0] if stats else 'no stats'}")
        assert got == ref, f"{fx}: greedy with --mtp-draft {nd} differs:\n{got}\n{ref}"
        assert stats and " drafts 0," not in stats[0], f"{fx}: nothing was drafted: {err}"


@pytest.mark.parametrize("fx,split", [("tiny_yarn_48", "2,3"), ("tiny_yarn_48_release", "1,1,3"),
                                      ("h256_40_release", "1,1")])
def test_mtp_with_a_layer_split_equals_plain_greedy(fx, split, models, tmp_path):
    """Speculative decoding over a layer split (strict backends, the MTP block beside the last part): the same
    greedy tokens and prompt logits as one backend without MTP, so drafts, verification and the rollback of every
    part's rings work across parts."""
    m = json.loads((ORACLE / fx / "meta.json").read_text())
    main, mtp = models(m["model"])
    ref, _ = greedy(main, fx, tmp_path / "a.f32", m["release"], 24)
    got, err = greedy(main, fx, tmp_path / "b.f32", m["release"], 24, mtp,
                      ("--mtp-draft", "3", "--mtp-gate", "0", "--strict-backend", "--split", split))
    stats = [x for x in err.splitlines() if "ds4: mtp:" in x]
    assert got == ref, f"{fx} split {split}: greedy with MTP differs:\n{got}\n{ref}"
    assert stats and " drafts 0," not in stats[0], err
    a = np.fromfile(tmp_path / "a.f32", dtype="<u4")
    b = np.fromfile(tmp_path / "b.f32", dtype="<u4")
    assert np.array_equal(a, b), f"{fx} split {split}: prompt logits differ"


# ---- NumPy float64 reference of MODEL.md C.12 -------------------------------------------------------------------

def rms(x, w=None, eps=1e-6):
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y * w if w is not None else y


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


class MtpRef:
    """The MTP block (C.12 steps 1-5, with C.2-C.9 written out) in float64."""

    def __init__(self, fields, t):
        k = lambda s: fields["deepseek4." + s]  # noqa: E731
        self.t = t
        self.eps = float(k("attention.layer_norm_rms_epsilon"))
        self.hc_eps = float(k("hyper_connection.epsilon"))
        self.iters = int(k("hyper_connection.sinkhorn_iterations"))
        self.n_hc = int(k("hyper_connection.count"))
        self.H = int(k("attention.head_count"))
        self.dh = int(k("attention.key_length"))
        self.n_rot = int(k("rope.dimension_count"))
        self.G = int(k("attention.output_group_count"))
        self.o_lora = int(k("attention.output_lora_rank"))
        self.K = int(k("expert_used_count"))
        self.W = int(k("attention.sliding_window"))
        self.scale = float(k("expert_weights_scale"))
        self.clamp = float(list(k("swiglu_clamp_exp"))[-1])
        base = float(k("rope.freq_base"))
        self.inv_freq = base ** (-np.arange(0, self.n_rot, 2) / self.n_rot)
        self.kv = []  # the block's raw rows, by position

    def T(self, s):
        return self.t["mtp.0." + s]

    def rope(self, z, pos, inverse=False):
        z = z.copy()
        th = pos * self.inv_freq * (-1 if inverse else 1)
        c, s = np.cos(th), np.sin(th)
        x0, x1 = z[..., -self.n_rot::2].copy(), z[..., -self.n_rot + 1::2].copy()
        z[..., -self.n_rot::2] = x0 * c - x1 * s
        z[..., -self.n_rot + 1::2] = x0 * s + x1 * c
        return z

    def hc_pre(self, X, which):
        fn, sc, b = self.T(f"hc_{which}_fn.weight"), self.T(f"hc_{which}_scale.weight"), self.T(f"hc_{which}_base.weight")
        h = self.n_hc
        m = fn @ rms(X.reshape(-1), eps=self.eps)
        pre = sigmoid(m[:h] * sc[0] + b[:h]) + self.hc_eps
        post = 2 * sigmoid(m[h:2 * h] * sc[1] + b[h:2 * h])
        Z = (m[2 * h:] * sc[2] + b[2 * h:]).reshape(h, h)  # Z[a, b], a = source
        C = np.exp(Z - Z.max(axis=1, keepdims=True))
        C = C / C.sum(axis=1, keepdims=True) + self.hc_eps
        C = C / (C.sum(axis=0, keepdims=True) + self.hc_eps)
        for _ in range(self.iters - 1):
            C = C / (C.sum(axis=1, keepdims=True) + self.hc_eps)
            C = C / (C.sum(axis=0, keepdims=True) + self.hc_eps)
        x = (pre[:, None] * X).sum(axis=0)
        return x, post, C

    @staticmethod
    def hc_post(y, X, post, C):
        return post[:, None] * y[None, :] + C.T @ X

    def attention(self, u, pos):
        cq = rms(self.T("attn_q_a.weight") @ u, self.T("attn_q_a_norm.weight"), self.eps)
        Q = (self.T("attn_q_b.weight") @ cq).reshape(self.H, self.dh)
        Q = rms(Q, eps=self.eps)
        kv = rms(self.T("attn_kv.weight") @ u, self.T("attn_kv_a_norm.weight"), self.eps)
        Q = self.rope(Q, pos)
        kv = self.rope(kv, pos)
        self.kv.append(kv)
        rows = np.array(self.kv[max(0, pos - self.W + 1):pos + 1])
        sinks = self.T("attn_sinks.weight")
        S = Q @ rows.T / np.sqrt(self.dh)  # (H, rows)
        mx = np.maximum(S.max(axis=1), sinks)
        e = np.exp(S - mx[:, None])
        den = np.exp(sinks - mx) + e.sum(axis=1)
        O = (e @ rows) / den[:, None]
        O = self.rope(O, pos, inverse=True)
        hpg = self.H // self.G
        Wa = self.T("attn_output_a.weight")
        z = np.concatenate([Wa[g * self.o_lora:(g + 1) * self.o_lora] @ O[g * hpg:(g + 1) * hpg].reshape(-1)
                            for g in range(self.G)])
        return self.T("attn_output_b.weight") @ z

    def swiglu(self, g, u):
        g = np.minimum(g, self.clamp)
        u = np.clip(u, -self.clamp, self.clamp)
        return g / (1 + np.exp(-g)) * u

    def ffn(self, v):
        lg = self.T("ffn_gate_inp.weight") @ v
        s = np.sqrt(np.where(lg > 20, lg, np.log1p(np.exp(np.minimum(lg, 20)))))
        ids = np.argsort(-(s + self.T("exp_probs_b.bias")), kind="stable")[:self.K]
        wts = s[ids] / s[ids].sum() * self.scale
        out = np.zeros_like(v)
        for e, wt in zip(ids, wts):
            h = self.swiglu(self.T("ffn_gate_exps.weight")[e] @ v, self.T("ffn_up_exps.weight")[e] @ v) * wt
            out += self.T("ffn_down_exps.weight")[e] @ h
        h = self.swiglu(self.T("ffn_gate_shexp.weight") @ v, self.T("ffn_up_shexp.weight") @ v)
        return out + self.T("ffn_down_shexp.weight") @ h

    def step(self, Hc, tok, pos):
        """One pair (Hc, t') at MTP position pos: (logits, output state)."""
        e = rms(self.t["token_embd.weight"][tok], self.T("enorm.weight"), self.eps)
        hh = rms(Hc, self.T("hnorm.weight"), self.eps)
        X = (self.T("e_proj.weight") @ e)[None, :] + hh @ self.T("h_proj.weight").T
        x, post, C = self.hc_pre(X, "attn")
        y = self.attention(rms(x, self.T("attn_norm.weight"), self.eps), pos)
        X = self.hc_post(y, X, post, C)
        x, post, C = self.hc_pre(X, "ffn")
        X = self.hc_post(self.ffn(rms(x, self.T("ffn_norm.weight"), self.eps)), X, post, C)
        m = self.T("hc_head_fn.weight") @ rms(X.reshape(-1), eps=self.eps)
        w = sigmoid(m * self.T("hc_head_scale.weight")[0] + self.T("hc_head_base.weight")) + self.hc_eps
        h = (w[:, None] * X).sum(axis=0)
        logits = self.t["output.weight"] @ rms(h, self.T("norm.weight"), self.eps)
        return logits, X


@pytest.mark.parametrize("model,fx", [("tiny_yarn", "tiny_yarn_37"), ("h256", "h256_40")])
def test_mtp_block_matches_float64_numpy_reference(model, fx, models, tmp_path):
    main, mtp = models(model)
    out = tmp_path / "mtp.f32"
    cmd = [str(ROOT / "build" / "dev" / "mtp_dump"), str(main), str(mtp), str(ORACLE / fx / "tokens.txt"), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    fields, t = read_gguf(main)
    _, tm = read_gguf(mtp)
    t.update(tm)
    ref = MtpRef(fields, t)
    toks = [int(x) for x in (ORACLE / fx / "tokens.txt").read_text().split()]
    n_hc, D, V = ref.n_hc, t["token_embd.weight"].shape[1], t["token_embd.weight"].shape[0]
    rec = n_hc * D * 2 + V
    data = np.fromfile(out, dtype="<f4").astype(np.float64)
    assert data.size == rec * (len(toks) - 1)
    worst_l, worst_x = 0.0, 0.0
    for i in range(len(toks) - 1):
        row = data[i * rec:(i + 1) * rec]
        hc = row[:n_hc * D].reshape(n_hc, D)
        got_l = row[n_hc * D:n_hc * D + V]
        got_x = row[n_hc * D + V:].reshape(n_hc, D)
        want_l, want_x = ref.step(hc, toks[i + 1], i)
        worst_l = max(worst_l, float(np.abs(got_l - want_l).max() / max(1.0, np.abs(want_l).max())))
        worst_x = max(worst_x, float(np.abs(got_x - want_x).max() / max(1.0, np.abs(want_x).max())))
    print(f"{model}: {len(toks) - 1} pairs (window {ref.W}); max rel |dlogit| {worst_l:.2e}, "
          f"max rel |dstate| {worst_x:.2e}")
    assert worst_l < 1e-4 and worst_x < 1e-4


# ---- errors and the CLI line ------------------------------------------------------------------------------------

def test_mtp_bad_files_and_options_are_refused(models, tmp_path):
    main, _ = models("tiny_yarn")
    toks = str(ORACLE / "tiny_yarn_37" / "tokens.txt")
    base = [prog("ds4"), "-m", str(main), "--cpu", "--prompt-tokens-file", toks, "--dump-logits",
            str(tmp_path / "x.f32")]
    cases = [
        (make_mtp(main, tmp_path / "m1.gguf", drop=("mtp.0.h_proj.weight",)), "mtp.0.h_proj.weight"),
        (make_mtp(main, tmp_path / "m2.gguf", bad_shape="mtp.0.attn_kv.weight"), "mtp.0.attn_kv.weight"),
        (ORACLE / "tiny_yarn_37" / "tokens.txt", "MTP"),
        (tmp_path / "missing.gguf", "MTP"),
        ("", "empty"),
    ]
    # tensors beyond the block's 32 (a main layer's, a second block's, an unknown one)
    for i, name in enumerate(("blk.0.attn_norm.weight", "mtp.1.attn_norm.weight", "mtp.0.foo.weight")):
        cases.append((make_mtp(main, tmp_path / f"x{i}.gguf", extra=(name,)), f"tensor '{name}' is not part of"))
    # a GGUF of another architecture, although its tensors fit
    cases.append((make_mtp(main, tmp_path / "m4.gguf", arch="llama"), "general.architecture is 'llama'"))
    other, _ = models("h256")  # an MTP block of another model
    cases.append((make_mtp(other, tmp_path / "m3.gguf"), "mtp.0."))
    for path, want in cases:
        r = subprocess.run(base + ["--mtp", str(path)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1, f"{path}: exit {r.returncode}\n{r.stderr}"
        assert want in r.stderr, f"{path}: message does not name {want}: {r.stderr}"
    for opt, val in (("--mtp-draft", "0"), ("--mtp-draft", "5"), ("--mtp-gate", "2")):
        r = subprocess.run(base + [opt, val], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and opt in r.stderr, r.stderr
    # the drafting options without --mtp are usage errors in every program
    for cmd in ([prog("ds4"), "-m", str(main), "--cpu", "-p", "x", "-n", "1"],
                [prog("ds4-server"), "-m", str(main), "--cpu", "--port", "0"],
                [prog("ds4-bench"), "-m", str(main), "--cpu", "--ctx-start", "16", "--ctx-max", "16"]):
        for opt, val in (("--mtp-draft", "2"), ("--mtp-gate", "0.5")):
            if cmd[0].endswith("ds4-bench") and opt == "--mtp-gate":
                continue  # the bench has no gate (it measures fixed drafts)
            r = subprocess.run(cmd + [opt, val], capture_output=True, text=True, timeout=60)
            assert r.returncode == 2 and "--mtp" in r.stderr, f"{cmd[0]} {opt}: exit {r.returncode}\n{r.stderr}"


def test_cli_generation_with_mtp_prints_the_same_text_and_counters(tmp_path):
    demo = ROOT / "build" / "demo.gguf"
    if not demo.exists():
        pytest.skip("build/demo.gguf is made by `make test`")
    mtp = make_mtp(demo, tmp_path / "demo-mtp.gguf", seed=9)
    base = [prog("ds4"), "-m", str(demo), "--cpu", "-p", "Once upon a time", "-n", "40", "--temp", "0", "--nothink"]
    a = subprocess.run(base, capture_output=True, text=True, timeout=300)
    b = subprocess.run(base + ["--mtp", str(mtp), "--mtp-gate", "0"], capture_output=True, text=True, timeout=300)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout
    last = b.stderr.strip().splitlines()[-1]
    assert "mtp:" in last and "tokens/cycle" in last and "accepted" in last, last
    print(last)


def test_bench_profile_with_mtp_breaks_down_a_verify_cycle(tmp_path):
    """ds4-bench --profile --mtp: next to the decode step's stages, the per-stage time of one verify cycle of N+1
    rows, each with the decode step's time, their ratio and its share of the extra time (the shares of the stages
    that grew add up to about 100%)."""
    import re
    demo = ROOT / "build" / "demo.gguf"
    if not demo.exists():
        pytest.skip("build/demo.gguf is made by `make test`")
    mtp = make_mtp(demo, tmp_path / "demo-mtp.gguf", seed=9)
    r = subprocess.run([prog("ds4-bench"), "-m", str(demo), "--cpu", "-t", "2", "--mtp", str(mtp), "--mtp-draft", "3",
                        "--ctx-start", "32", "--ctx-max", "32", "--gen-tokens", "2", "--prefill-chunk", "32",
                        "--profile"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    head = [i for i, x in enumerate(lines) if x.startswith("  per-stage time of one verify cycle of 4 rows at 32 ")]
    assert len(head) == 1, r.stdout
    rows = {}
    for x in lines[head[0] + 1:]:
        m = re.match(r"    (\w+)\s+([0-9.]+) ms\s+([0-9.]+) ms\s+([0-9.]+) x\s+(-?[0-9.]+)%$", x)
        if not m:
            break
        rows[m.group(1)] = tuple(float(v) for v in m.groups()[1:])
    for st in ("hc_pre", "attn_project", "attention", "moe_experts", "head"):
        assert st in rows and rows[st][0] > 0 and rows[st][1] > 0, (st, rows)
    # times are printed to 0.001 ms and the ratio to 0.01, both from the unrounded times: the printed ratio must
    # lie in the range of v/d that the printed times allow (a 0.004 ms stage over 0.025 ms may be anything from
    # 0.137 to 0.184)
    for st, (v, d, ratio, share) in rows.items():
        if d > 0.01:
            lo, hi = max(v - 0.0005, 0.0) / (d + 0.0005), (v + 0.0005) / (d - 0.0005)
            assert lo - 0.005 - 1e-9 <= ratio <= hi + 0.005 + 1e-9, (st, v, d, ratio, lo, hi)
    total = float(re.search(r"stages sum ([0-9.]+) ms = ([0-9.]+) x", lines[head[0]]).group(1))
    assert abs(total - sum(v for v, *_ in rows.values())) < 0.01 * total + 0.01, (total, rows)
    # the shares are of the verify cycle's extra time over the decode step's; on a loaded 2-core machine a slow
    # decode step can leave no extra (the demo model's stages take ~0.1 ms), and then every share is 0 by definition
    dec_total = sum(d for _, d, *_ in rows.values())
    if all(s == 0.0 for *_, s in rows.values()):
        assert total <= dec_total + 0.01 * total + 0.01, (total, dec_total, rows)
    else:
        assert abs(sum(s for *_, s in rows.values()) - 100.0) < 1.0, rows


def test_server_with_mtp_gives_the_same_greedy_text_and_logs_counters(tmp_path):
    from test_server import NO_THINK, Server, demo_model, user
    mtp = make_mtp(demo_model(), tmp_path / "demo-mtp.gguf", seed=9)
    texts, sampled = [], []
    for args in ((), ("--mtp", str(mtp), "--mtp-gate", "0", "--mtp-draft", "2")):
        with Server(*args) as s:
            c = s.openai()
            r = c.chat.completions.create(model="deepseek-v4-flash", messages=user("Tell me a story"),
                                          max_tokens=30, temperature=0, extra_body=NO_THINK)
            texts.append(r.choices[0].message.content)
            assert r.usage.completion_tokens <= 30
            # a sampled request runs through the speculative-sampling path
            # a seeded sampled request, cold then with its prompt cached (coupled draws: the same text as
            # plain sampling with that seed, whatever the MTP drafted or the cache held)
            for _ in range(2):
                r2 = c.chat.completions.create(model="deepseek-v4-flash", messages=user("Once upon a time"),
                                               max_tokens=20, temperature=1.0, seed=5, extra_body=NO_THINK)
                assert r2.choices[0].finish_reason in ("stop", "length")
                sampled.append(r2.choices[0].message.content)
            if args:
                assert s.wait_log(r"MTP speculative decoding on: .*demo-mtp\.gguf, 2 drafts per cycle, gate 0"), s.log_text()
                assert s.wait_log(r"mtp \S+: \d+ cycles, [0-9.]+ tokens/cycle, drafts \d+, accepted"), s.log_text()
    assert texts[0] == texts[1]
    assert len(set(sampled)) == 1, f"seeded replies differ (plain cold, plain cached, mtp cold, mtp cached): {sampled}"


def test_server_over_a_layer_split_gives_the_same_text_and_reuses_the_cache(tmp_path):
    """ds4-server --cpu --split: the same greedy text as one backend, a second turn reuses the first's state
    (live KV reuse works layer by layer across the parts), and a stream equals its non-stream reply."""
    from test_server import NO_THINK, Server, user
    outs = []
    for args in ((), ("--split", "2,4")):
        with Server(*args) as s:
            c = s.openai()
            msgs = user("Tell me a story")
            r = c.chat.completions.create(model="deepseek-v4-flash", messages=msgs, max_tokens=24, temperature=0,
                                          extra_body=NO_THINK)
            msgs2 = msgs + [{"role": "assistant", "content": r.choices[0].message.content},
                            {"role": "user", "content": "And then?"}]
            r2 = c.chat.completions.create(model="deepseek-v4-flash", messages=msgs2, max_tokens=24, temperature=0,
                                           extra_body=NO_THINK)
            st = c.chat.completions.create(model="deepseek-v4-flash", messages=msgs2, max_tokens=24, temperature=0,
                                           extra_body=NO_THINK, stream=True)
            streamed = "".join(ch.choices[0].delta.content or "" for ch in st if ch.choices)
            assert streamed == r2.choices[0].message.content
            outs.append((r.choices[0].message.content, r2.choices[0].message.content,
                         r2.usage.prompt_tokens_details.cached_tokens if r2.usage.prompt_tokens_details else None))
    assert outs[0] == outs[1], outs
    assert outs[1][2], "the second turn reused no cached tokens"
