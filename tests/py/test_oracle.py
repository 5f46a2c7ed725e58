"""The CPU engine against transformers' DeepseekV4 (fixtures of tools/oracle/make_fixtures.py, docs/ORACLE.md).

For every fixture in tests/data/oracle: ds4-convert -> f32 GGUF -> `ds4 --cpu --dump-logits` (with
--plain-numerics for plain fixtures, the release path for *_release fixtures) -> compared with transformers'
logits at every position:
  - >= 99% of positions have max |dlogit| <= 1e-3 and none exceeds 0.05;
  - a position above 1e-3 must be explained by a near-tie (an indexer or router decision at or before it whose
    relative gap, from meta.json, is tiny); it is printed either way.
Also: decode and chunked prefill (chunks that split compressor windows) equal one prefill within 1e-4; a q8_0
GGUF keeps the f32 top-1 token at >= 98% of positions on the quantization-acceptance fixture (agreement and KL
printed for the others); damaged GGUFs fail with an error that names the tensor or key.
"""
import json
import subprocess

import numpy as np
import pytest

from conftest import prog
from oracle_util import ORACLE, convert, gguf_cache, gguf_rewrite

FIXTURES = sorted(p.parent.name for p in ORACLE.glob("*/meta.json"))
TOL, MAX_TOL, FRACTION = 1e-3, 0.05, 0.99
# a decision closer than this (relative gap, docs/MODEL.md C.6 / meta.json) may flip between two float32
# implementations; with the release rounding a flip of an FP8/FP4 code moves scores by up to a few percent
NEAR_TIE = {False: 1e-4, True: 2e-2}


def meta(fx):
    return json.loads((ORACLE / fx / "meta.json").read_text())


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """Lazily converted GGUFs: get(model, outtype) -> path."""
    return gguf_cache(tmp_path_factory.mktemp("oracle"))


def run_ds4(model, fx, out, release, eval_mode=None, check=True, backend="--cpu", extra=()):
    cmd = [prog("ds4"), "-m", str(model), backend, "--prompt-tokens-file", str(ORACLE / fx / "tokens.txt"),
           "--dump-logits", str(out), *extra]
    if not release:
        cmd.append("--plain-numerics")
    if eval_mode:
        cmd += ["--eval", eval_mode]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if not check:
        return r
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"
    m = meta(fx)
    return np.fromfile(out, dtype="<f4").reshape(m["n_tokens"], m["n_vocab"])


def near_ties(m, pos, thr):
    """Indexer / router decisions at positions <= pos closer than thr (a flip there can move logits at pos)."""
    out = []
    for kind in ("indexer_margins", "router_margins"):
        for r in m[kind]:
            if r["pos"] <= pos and not r["exact_tie"] and r["rel_gap"] < thr:
                out.append(f"{kind.split('_')[0]} layer {r['layer']} pos {r['pos']} gap {r['rel_gap']:.1e}")
    return out


@pytest.mark.parametrize("fx", FIXTURES)
def test_oracle_logits_match_transformers(fx, ggufs, tmp_path):
    m = meta(fx)
    release = m["release"]
    got = run_ds4(ggufs(m["model"]), fx, tmp_path / "out.f32", release)
    ref = np.fromfile(ORACLE / fx / "logits.f32", dtype="<f4").reshape(got.shape)
    d = np.abs(got.astype(np.float64) - ref).max(axis=1)
    n = len(d)
    ok = d <= TOL
    print(f"\n{fx} ({'release' if release else 'plain'} numerics, {n} positions): max {d.max():.2e} "
          f"p50 {np.percentile(d, 50):.2e} p90 {np.percentile(d, 90):.2e} p99 {np.percentile(d, 99):.2e} "
          f"(argmax pos {int(d.argmax())}), {int((~ok).sum())} positions > {TOL:g}; "
          f"transformers' own spread over {'/'.join(m.get('hf_spread_orders', ['decode']))} vs full: "
          f"{m['hf_cached_decode_vs_full_max_abs']:.1e}; "
          f"closest indexer gap {m['summary']['indexer']['closest_rel_gap']}, "
          f"router gap {m['summary']['router']['closest_rel_gap']}, "
          f"exact indexer ties {m['summary']['indexer']['n_exact_ties']}")
    unexplained = []
    for p in np.nonzero(~ok)[0]:
        why = near_ties(m, int(p), NEAR_TIE[release])
        print(f"  pos {p}: max |dlogit| {d[p]:.3e}; transformers' own spread there "
              f"{m['hf_cached_decode_vs_full_per_pos'][p]:.1e}; near-ties: {'; '.join(why[:4]) if why else 'none'}")
        if not why:
            unexplained.append(int(p))
    assert d.max() <= MAX_TOL, f"{fx}: max |dlogit| {d.max():.3e} > {MAX_TOL}"
    assert ok.mean() >= FRACTION, f"{fx}: only {ok.mean():.1%} of positions within {TOL}"
    assert not unexplained, f"{fx}: positions {unexplained} exceed {TOL} with no near-tie to explain them"


# fixtures whose prefill is compared with decode and chunked prefill (chunks of 3, 5, 7 split the 4- and
# 8-token compressor windows; 16 ends on window boundaries)
EVAL_FIXTURES = [f for f in ("tiny_yarn_48", "tiny_yarn_37", "tiny_plain_37", "tiny_yarn_48_release",
                             "tiny_plain_37_release", "h256_40", "h256_sharp_96") if f in FIXTURES]


@pytest.mark.parametrize("fx", EVAL_FIXTURES)
def test_oracle_decode_and_chunked_prefill_equal_prefill(fx, ggufs, tmp_path):
    m = meta(fx)
    model = ggufs(m["model"])
    base = run_ds4(model, fx, tmp_path / "prefill.f32", m["release"], "prefill")
    worst = {}
    for mode in ("decode", "chunk:1", "chunk:3", "chunk:5", "chunk:7", "chunk:16"):
        got = run_ds4(model, fx, tmp_path / "x.f32", m["release"], mode)
        worst[mode] = float(np.abs(got - base).max())
    print(f"\n{fx}: max |dlogit| vs one prefill: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    bad = {k: v for k, v in worst.items() if v > 1e-4}
    assert not bad, f"{fx}: eval modes differ from prefill by more than 1e-4: {bad}"


@pytest.mark.parametrize("fx", FIXTURES)
def test_strict_backend_runs_every_fixture_equal_to_cpu(fx, ggufs, tmp_path):
    """The backend contract (src/backend.h): the strict test backend copies the weights into its own arena and
    fails any stage that receives a pointer it did not allocate or bind. Every fixture runs through it, in one
    prefill and token by token, and gives the CPU's logits bit for bit (same math, only the memory differs)."""
    m = meta(fx)
    model = ggufs(m["model"])
    for mode in ("prefill", "decode", "chunk:5"):
        cpu = run_ds4(model, fx, tmp_path / "cpu.f32", m["release"], mode)
        strict = run_ds4(model, fx, tmp_path / "strict.f32", m["release"], mode, backend="--strict-backend")
        assert np.array_equal(cpu.view(np.uint32), strict.view(np.uint32)), f"{fx} {mode}: strict != cpu"


# layer splits (docs/ARCHITECTURE.md "Several GPUs") per model: blocks per part
SPLITS = {"tiny_yarn": ["1,4", "2,3", "4,1", "1,1,1,1,1"], "tiny_plain": ["2,2", "1,2,1"], "h256": ["1,1"],
          "h256_sharp": ["2,1", "1,1,1"]}


@pytest.mark.parametrize("fx", [f for f in FIXTURES if f != "tiny_yarn_2"])
def test_layer_split_equals_one_backend(fx, ggufs, tmp_path):
    """A layer split runs each part's blocks on its own backend and hands the HC states on. Every fixture, split
    several ways over strict backends (each rejects a pointer of another part: a part reads only its own weights,
    state and activations), gives the unsplit CPU's logits bit for bit in one prefill, token by token and in
    chunks of 5; the default split (parts of equal bytes) and the MTP path are covered by test_mtp.py."""
    m = meta(fx)
    model = ggufs(m["model"])
    for mode in ("prefill", "decode", "chunk:5"):
        one = run_ds4(model, fx, tmp_path / "one.f32", m["release"], mode)
        for split in SPLITS[m["model"]]:
            got = run_ds4(model, fx, tmp_path / "split.f32", m["release"], mode, backend="--strict-backend",
                          extra=["--split", split])
            assert np.array_equal(one.view(np.uint32), got.view(np.uint32)), f"{fx} {mode} split {split}: differs"


def test_layer_split_refuses_bad_splits(ggufs, tmp_path):
    model = ggufs("tiny_yarn")  # 5 blocks
    cases = [(["--cpu", "--split", "2,2"], "the parts hold 4 blocks, the model has 5"),
             (["--cpu", "--split", "5,0"], "not a list of numbers"),
             (["--cpu", "--split", "1,1,1,1,1,1"], "needs at least 6 blocks"),
             (["--cpu", "--split", "2,3", "--gpus", "3"], "--split names 2 parts, --gpus 3"),
             (["--cpu", "--gpus", "2"], "--gpus needs the CUDA backend"),
             (["--cpu", "--split", "1,1,1,1,1,1,1,1,1"], "at most 8 parts"),
             (["--cpu", "--gpus", "0,x"], "not a list of numbers")]
    for args, want in cases:
        r = subprocess.run([prog("ds4"), "-m", str(model), *args, "-p", "hi", "-n", "1"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode != 0 and want in r.stderr, (args, r.returncode, r.stderr)
        assert "Segmentation" not in r.stderr and "Assertion" not in r.stderr


def _log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


@pytest.mark.parametrize("fx", [f for f in ("tiny_yarn_48", "h256_40") if f in FIXTURES])
def test_oracle_q8_0_equals_f32_of_dequantized_weights(fx, ggufs, tmp_path):
    """The engine's Q8_0 path computes exactly what F32 weights holding the dequantized Q8_0 values give (plain
    numerics: no activation quantization), so any q8_0-vs-f32 difference is the weights' rounding itself."""
    import gguf
    m = meta(fx)
    q8 = ggufs(m["model"], "q8_0")
    deq = tmp_path / "deq.gguf"

    def to_f32(name, qt, a):
        if qt == gguf.GGMLQuantizationType.Q8_0:
            return gguf.GGMLQuantizationType.F32, gguf.quants.dequantize(a, qt).astype(np.float32)
    gguf_rewrite(q8, deq, tensor_fn=to_f32)
    a = run_ds4(q8, fx, tmp_path / "a.f32", False)
    b = run_ds4(deq, fx, tmp_path / "b.f32", False)
    d = float(np.abs(a - b).max())
    print(f"\n{fx}: q8_0 GGUF vs f32 GGUF of its dequantized weights: max |dlogit| {d:.1e}")
    assert d <= 1e-4


# the fixture whose output is as sharp as a trained LM's (make_fixtures.py MODELS['h256_sharp'], meta.json "why")
Q8_ACCEPT = "h256_sharp_96"


@pytest.mark.parametrize("fx", [f for f in ("tiny_yarn_48", "tiny_plain_37", "h256_40", Q8_ACCEPT) if f in FIXTURES])
def test_oracle_q8_0_keeps_top1(fx, ggufs, tmp_path):
    """q8_0 GGUF vs f32 GGUF of the same model, plain numerics: same top-1 token at >= 98% of positions (issue 3),
    asserted on Q8_ACCEPT only; for the other fixtures the agreement and KL are printed, not asserted.

    Why: the random G.3 models have near-uniform outputs (median top-1 probability 0.02-0.05, median top-1/top-2
    gap 0.12-0.20 logit), while q8_0's rounding of the projections moves their logits by up to 0.26-0.59 (the
    recipe's F16 tensors are exact for bf16/f16 weights and change tiny_plain's f32 ones by <= 1e-3): ~0.02 from
    the head alone, the rest from the attention projections and experts, amplified where the rounding flips one of
    the close indexer / router top-k decisions that these small models take over a handful of rows / experts
    (in transformers with q8_0-rounded weights: 9/66 indexer and 5/96 router decisions on tiny_yarn_48). Their top-1
    therefore changes at 2-6% of positions, a property of the fixture, not of the engine: the q8_0 path computes
    exactly the dequantized weights' logits (test_oracle_q8_0_equals_f32_of_dequantized_weights). Q8_ACCEPT has a
    trained-LM-like margin (a few logits; its meta.json "output_margins"), where the bound is meaningful."""
    m = meta(fx)
    f32 = run_ds4(ggufs(m["model"], "f32"), fx, tmp_path / "a.f32", False)
    q8 = run_ds4(ggufs(m["model"], "q8_0"), fx, tmp_path / "b.f32", False)
    same = (f32.argmax(1) == q8.argmax(1)).mean()
    lp, lq = _log_softmax(f32), _log_softmax(q8)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=1)
    srt = np.sort(f32, axis=1)
    gap = srt[:, -1] - srt[:, -2]
    print(f"\n{fx}: q8_0 vs f32: same top-1 at {same:.1%} of positions, mean KL {kl.mean():.2e}, "
          f"max KL {kl.max():.2e}, max |dlogit| {np.abs(f32 - q8).max():.2e}; f32 top-1/top-2 gap median "
          f"{np.median(gap):.3f} p10 {np.percentile(gap, 10):.3f}"
          f"{' (asserted >= 98%)' if fx == Q8_ACCEPT else ' (reported only, see docstring)'}")
    if fx == Q8_ACCEPT:
        assert same >= 0.98, f"{fx}: q8_0 keeps the f32 top-1 at only {same:.1%} of positions"


# --- damaged GGUFs must fail with an error naming what is wrong ------------------------------------------------

def _trunc_rows(name):
    def fn(n, qt, a):
        return (qt, a[:-1]) if n == name else None
    return fn


def _as_type(name, qtype, conv):
    def fn(n, qt, a):
        return (qtype, conv(a)) if n == name else None
    return fn


def _damages():
    import gguf
    QT, VT = gguf.GGMLQuantizationType, gguf.GGUFValueType
    return {
        "missing_tensor": (dict(drop={"blk.2.attn_kv.weight"}), ["blk.2.attn_kv.weight"]),
        "wrong_shape": (dict(tensor_fn=_trunc_rows("blk.1.attn_q_b.weight")), ["blk.1.attn_q_b.weight"]),
        "wrong_type": (dict(tensor_fn=_as_type("blk.0.ffn_gate_tid2eid.weight", QT.F32,
                                               lambda a: a.astype(np.float32))), ["blk.0.ffn_gate_tid2eid.weight"]),
        "wrong_vector_type": (dict(tensor_fn=_as_type("blk.3.attn_norm.weight", QT.I32,
                                                      lambda a: a.astype(np.int32))), ["blk.3.attn_norm.weight"]),
        "metadata_expert_count": (dict(kv={"deepseek4.expert_count": (7, VT.UINT32, None)}), ["ffn_"]),
        "metadata_ratios_short": (dict(kv={"deepseek4.attention.compress_ratios": ([0, 0, 4, 8], VT.ARRAY, VT.INT32)}),
                                  ["compress_ratios"]),
        "metadata_missing_key": (dict(drop_kv={"deepseek4.attention.q_lora_rank"}), ["q_lora_rank"]),
        "metadata_key_type": (dict(kv={"deepseek4.block_count": ("five", VT.STRING, None)}), ["block_count"]),
    }


@pytest.mark.parametrize("damage", ["missing_tensor", "wrong_shape", "wrong_type", "wrong_vector_type",
                                    "metadata_expert_count", "metadata_ratios_short", "metadata_missing_key",
                                    "metadata_key_type"])
def test_oracle_damaged_gguf_fails_naming_it(damage, ggufs, tmp_path):
    kwargs, needles = _damages()[damage]
    bad = tmp_path / f"{damage}.gguf"
    gguf_rewrite(ggufs("tiny_yarn"), bad, **kwargs)
    r = run_ds4(bad, "tiny_yarn_48", tmp_path / "x.f32", False, check=False)
    print(f"\n{damage}: rc {r.returncode}: {r.stderr.strip()[-300:]}")
    assert r.returncode > 0, "ds4 must fail with an exit status, not succeed or crash"
    for s in needles:
        assert s in r.stderr, (s, r.stderr)
