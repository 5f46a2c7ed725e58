"""The CUDA backend end to end (make test-cuda; needs a GPU and a `make cuda` build).

- Every oracle fixture through `ds4 --cuda --dump-logits`: plain numerics against transformers (every position
  within 1e-4, or explained by a recorded near-tie), release numerics against the CPU reference (>= 99% of
  positions within 2e-3; the others printed with the near-ties that explain them).
- prefill == decode == chunked prefill on the GPU, bit for bit; two runs bit for bit; decode steps replayed
  from CUDA graphs equal eager decode bit for bit.
- Small models in the published q2/q4 type mixes (written by build/cuda/test_stages): CUDA logits against the
  CPU's, and the same greedy continuation (argmax on the GPU, graphs on).
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "py"))
from oracle_util import ORACLE, convert, gguf_cache  # noqa: E402

DS4 = str(ROOT / "ds4")
STAGE_MODELS = pathlib.Path(os.environ.get("DS4_STAGE_MODELS", "/tmp/ds4-stages"))
FIXTURES = sorted(p.parent.name for p in ORACLE.glob("*/meta.json"))


def meta(fx):
    return json.loads((ORACLE / fx / "meta.json").read_text())


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    return gguf_cache(tmp_path_factory.mktemp("cuda-oracle"))


def run(model, tokens_file, out, backend, release, *extra, env=None):
    cmd = [DS4, "-m", str(model), backend, "--prompt-tokens-file", str(tokens_file), "--dump-logits", str(out),
           *extra]
    if not release:
        cmd.append("--plain-numerics")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"
    n = len(pathlib.Path(tokens_file).read_text().split())
    lg = np.fromfile(out, dtype="<f4")
    return lg.reshape(n, -1), r.stdout


def near_ties(m, pos, thr):
    out = []
    for kind in ("indexer_margins", "router_margins"):
        for r in m[kind]:
            if r["pos"] <= pos and not r["exact_tie"] and r["rel_gap"] < thr:
                out.append(f"{kind.split('_')[0]} L{r['layer']} pos {r['pos']} gap {r['rel_gap']:.1e}")
    return out


@pytest.mark.parametrize("fx", FIXTURES)
def test_cuda_oracle_fixture(fx, ggufs, tmp_path):
    m = meta(fx)
    release = m["release"]
    model = ggufs(m["model"])
    toks = ORACLE / fx / "tokens.txt"
    gpu, _ = run(model, toks, tmp_path / "g.f32", "--cuda", release)
    cpu, _ = run(model, toks, tmp_path / "c.f32", "--cpu", release)
    ref = np.fromfile(ORACLE / fx / "logits.f32", dtype="<f4").reshape(gpu.shape)
    check_fixture(fx, m, release, gpu, cpu, ref)


TC_FLIPS = {"tiny_yarn_48_release"}  # measured: see the docstring below


@pytest.mark.parametrize("fx", [pytest.param(f, marks=pytest.mark.xfail(
    reason="known: with the TF32-split attention a release rounding upstream flips the indexer choice at L2 pos 38 "
           "(oracle margin 4.3e-3) and the router choice at L4 pos 42 (margin 4.4e-4): positions 39-46 part from the CPU"))
    if f in TC_FLIPS else f for f in FIXTURES])
def test_cuda_oracle_fixture_attention_tc(fx, ggufs, tmp_path):
    """The opt-in tensor-core attention (DS4_CUDA_ATT_TC=1) under the same bounds as the default, and its
    difference from the default (CUDA-core) attention printed: the accuracy cost of the TF32-split path.
    Run on the H200 (2026-12-04, as the default then): every plain fixture and h256_40_release /
    tiny_plain_37_release pass; tiny_yarn_48_release fails (a rounding/top-k flip from position ~39, max |d| 0.21
    vs the CPU), which is why the path is not the default."""
    fixture_with_switch(fx, ggufs, tmp_path, "DS4_CUDA_ATT_TC", "attention on tensor cores vs CUDA cores")


@pytest.mark.parametrize("fx", FIXTURES)
def test_cuda_oracle_fixture_att_two_pass(fx, ggufs, tmp_path):
    """The two-pass attention merge (DS4_CUDA_ATT_ONLINE=0: every split's partial written, then merged against the
    maximum over all splits) under the same bounds as the default online merge (the splits folded in order with
    running rescales, batches merged inside k_attn_fused), its difference from the default printed: other
    roundings of the same softmax."""
    fixture_with_switch(fx, ggufs, tmp_path, "DS4_CUDA_ATT_ONLINE", "two-pass merge vs online merge", "0")


@pytest.mark.parametrize("online", ["1", "0"])
@pytest.mark.parametrize("name,release", [("flash", True), ("flash-plain", False), ("q2-wide", True)])
def test_cuda_att_online_bitwise(name, release, online, tmp_path):
    """DS4_CUDA_ATT_ONLINE=1 (the default): batches merge their attention splits inside k_attn_fused, and fewer
    tokens (decode, MTP verify rows) fold the partials of k_attn_part in k_attn_merge<ON> with the same operations
    in the same order, so prefill of 80 tokens == token-by-token decode == chunks of 3, 16 and 48 == prefill by
    k_attn_part + the online merge (DS4_CUDA_NO_ATT_FUSED=1, DS4_CUDA_ATT_FUSED_MAX_S=0) == the fused kernel with 4
    and 16 heads per block, f32 staged rows, the head size at run time == decode with the merge in one block per
    head, bit for bit. The same invariants with the default two-pass merge (DS4_CUDA_ATT_ONLINE=0), where every
    batch takes k_attn_part + k_attn_merge."""
    model = _stage_model(name)
    rng = np.random.default_rng(13)
    toks = tmp_path / "t.txt"
    toks.write_text(" ".join(str(x) for x in rng.integers(0, 300, 80)))
    on = dict(os.environ, DS4_CUDA_ATT_ONLINE=online)
    base, _ = run(model, toks, tmp_path / "p.f32", "--cuda", release, "--eval", "prefill", env=on)
    modes = [("decode", {}), ("chunk:3", {}), ("chunk:16", {}), ("chunk:48", {}),
             ("prefill", {"DS4_CUDA_NO_ATT_FUSED": "1"}), ("prefill", {"DS4_CUDA_ATT_FUSED_MAX_S": "0"}),
             ("prefill", {"DS4_CUDA_ATT_HB": "4"}),
             ("prefill", {"DS4_CUDA_ATT_HB": "16"}), ("prefill", {"DS4_CUDA_ATT_RH": "0"}),
             ("prefill", {"DS4_CUDA_ATT_DH_RT": "1"}), ("decode", {"DS4_CUDA_NO_MERGE_SLICES": "1"}),
             ("prefill", {"DS4_CUDA_NO_MMA": "1"})]
    for mode, sw in modes:
        got, _ = run(model, toks, tmp_path / "x.f32", "--cuda", release, "--eval", mode, env=dict(on, **sw))
        d = float(np.abs(got.astype(np.float64) - base).max())
        print(f"\n{name} --eval {mode} DS4_CUDA_ATT_ONLINE={online} {sw}: max |d| vs its prefill {d:.2e}")
        assert np.array_equal(got.view(np.uint32), base.view(np.uint32)), f"{name} {mode} {sw} differs: {d:.2e}"


def fixture_with_switch(fx, ggufs, tmp_path, var, what, value="1"):
    """Fixture fx through the CUDA backend with switch var=value, checked as the default is (check_fixture), and its
    distance from the default run printed."""
    m = meta(fx)
    release = m["release"]
    model = ggufs(m["model"])
    toks = ORACLE / fx / "tokens.txt"
    base, _ = run(model, toks, tmp_path / "s.f32", "--cuda", release)
    gpu, _ = run(model, toks, tmp_path / "g.f32", "--cuda", release, env=dict(os.environ, **{var: value}))
    cpu, _ = run(model, toks, tmp_path / "c.f32", "--cpu", release)
    ref = np.fromfile(ORACLE / fx / "logits.f32", dtype="<f4").reshape(gpu.shape)
    d = np.abs(gpu.astype(np.float64) - base).max(axis=1)
    print(f"\n{fx}: {what} max |dlogit| {d.max():.2e} p50 {np.median(d):.2e}, "
          f"same argmax at {(gpu.argmax(1) == base.argmax(1)).mean():.1%}")
    check_fixture(f"{fx} {var}={value}", m, release, gpu, cpu, ref)


def check_fixture(fx, m, release, gpu, cpu, ref):
    d_hf = np.abs(gpu.astype(np.float64) - ref).max(axis=1)
    d_cpu = np.abs(gpu.astype(np.float64) - cpu).max(axis=1)
    print(f"\n{fx} ({'release' if release else 'plain'}): cuda vs transformers max {d_hf.max():.2e} "
          f"p50 {np.median(d_hf):.2e}; cuda vs cpu max {d_cpu.max():.2e} p50 {np.median(d_cpu):.2e}; "
          f"same argmax as cpu at {(gpu.argmax(1) == cpu.argmax(1)).mean():.1%}")
    if not release:
        bad = [int(p) for p in np.nonzero(d_hf > 1e-4)[0] if not near_ties(m, int(p), 1e-4)]
        for p in np.nonzero(d_hf > 1e-4)[0]:
            print(f"  pos {p}: |d| {d_hf[p]:.2e}; near-ties: {near_ties(m, int(p), 1e-4)[:3]}")
        assert not bad, f"{fx}: positions {bad} differ from transformers by > 1e-4 with no near-tie"
    else:
        ok = d_cpu <= 2e-3
        for p in np.nonzero(~ok)[0]:
            print(f"  pos {p}: cuda vs cpu |d| {d_cpu[p]:.2e}; near-ties: {near_ties(m, int(p), 2e-2)[:3]}")
        assert ok.mean() >= 0.99, f"{fx}: only {ok.mean():.1%} of positions within 2e-3 of the CPU"
        assert d_cpu.max() <= 0.05


EVAL = [f for f in ("tiny_yarn_48", "tiny_yarn_48_release", "tiny_plain_37_release", "h256_40") if f in FIXTURES]


@pytest.mark.parametrize("fx", EVAL)
def test_cuda_eval_modes_bitwise(fx, ggufs, tmp_path):
    """prefill == token-by-token decode == chunked prefill on the GPU, bit for bit, graphs on and off."""
    m = meta(fx)
    model = ggufs(m["model"])
    toks = ORACLE / fx / "tokens.txt"
    base, _ = run(model, toks, tmp_path / "p.f32", "--cuda", m["release"], "--eval", "prefill")
    for mode in (["--eval", "decode"], ["--eval", "decode", "--no-graphs"], ["--eval", "chunk:3"], ["--eval", "chunk:4"],
                 ["--eval", "chunk:16"], ["--eval", "prefill"]):
        got, _ = run(model, toks, tmp_path / "x.f32", "--cuda", m["release"], *mode)
        d = float(np.abs(got.astype(np.float64) - base).max())
        print(f"\n{fx} {' '.join(mode)}: max |d| vs prefill {d:.2e}")
        assert np.array_equal(got.view(np.uint32), base.view(np.uint32)), f"{fx} {mode} differs: {d:.2e}"


def _stage_model(name):
    p = STAGE_MODELS / f"stages_{name}.gguf"
    if not p.exists():
        pytest.skip(f"{p} missing (written by build/cuda/test_stages {STAGE_MODELS})")
    return p


@pytest.mark.parametrize("name,release,att_tc", [("q2-wide", True, False), ("flash", True, False),
                                                 ("flash-plain", False, False), ("flash", True, True),
                                                 ("flash-plain", False, True)])
def test_cuda_tensor_core_batches_bitwise(name, release, att_tc, tmp_path):
    """Batches of 32+ tokens take the tensor-core kernels (Q8_0 projections; IQ2_XXS gate + up and Q2_K down on
    q2-wide, whose rows are 1024 values): prefill of 80 tokens == token-by-token decode == chunks of 16 (CUDA-core kernels) ==
    chunks of 48 (a partial tile) == prefill with DS4_CUDA_NO_MMA=1, bit for bit. With att_tc, all of it with the
    tensor-core attention (DS4_CUDA_ATT_TC=1: 16 heads per block below 32 tokens, 64 from 32); without, also prefill
    with 2 attention splits per block (DS4_CUDA_ATT_ZB=2: the looping kernel for half rows on flash, float rows on
    flash-plain), with and without the head size as a template constant."""
    model = _stage_model(name)
    rng = np.random.default_rng(11)
    toks = tmp_path / "t.txt"
    toks.write_text(" ".join(str(x) for x in rng.integers(0, 300, 80)))
    tc = dict(os.environ, DS4_CUDA_ATT_TC="1") if att_tc else None
    base, _ = run(model, toks, tmp_path / "p.f32", "--cuda", release, "--eval", "prefill", env=tc)
    no_mma = dict(tc or os.environ, DS4_CUDA_NO_MMA="1")
    modes = [(["--eval", "decode"], tc), (["--eval", "chunk:16"], tc), (["--eval", "chunk:48"], tc),
             (["--eval", "prefill"], no_mma)]
    if not att_tc:
        # (the looping kernel takes 16 heads per block: with f32 staged rows, ATT_RH=0; half rows take 8)
        modes += [(["--eval", "prefill"], dict(os.environ, DS4_CUDA_ATT_ZB="2", DS4_CUDA_ATT_RH="0")),
                  (["--eval", "prefill"], dict(os.environ, DS4_CUDA_ATT_ZB="2", DS4_CUDA_ATT_DH_RT="1",
                                               DS4_CUDA_ATT_RH="0")),
                  (["--eval", "prefill"], dict(os.environ, DS4_CUDA_ATT_RH="0")),
                  (["--eval", "decode"], dict(os.environ, DS4_CUDA_ATT_RH="0"))]
    for mode, env in modes:
        got, _ = run(model, toks, tmp_path / "x.f32", "--cuda", release, *mode, env=env)
        d = float(np.abs(got.astype(np.float64) - base).max())
        sw = " ".join(f"{k}={v}" for k, v in (env or {}).items() if k.startswith("DS4_CUDA_") and os.environ.get(k) != v)
        print(f"\n{name} {' '.join(mode)} {sw}: max |d| vs prefill {d:.2e}")
        assert np.array_equal(got.view(np.uint32), base.view(np.uint32)), f"{name} {mode} differs: {d:.2e}"


_AB_BASE = {}


@pytest.mark.parametrize("var,val", [("DS4_CUDA_ATT_HB", "1"), ("DS4_CUDA_ATT_HB", "4"), ("DS4_CUDA_ATT_HB", "8"),
                                     ("DS4_CUDA_ATT_HB", "16"), ("DS4_CUDA_NO_MOE_FUSE", "1"),
                                     ("DS4_CUDA_NO_HC_BATCH", "1"), ("DS4_CUDA_NO_PREQ", "1"), ("DS4_CUDA_MV_R1", "1"),
                                     ("DS4_CUDA_MM_TW", "2"), ("q2:DS4_CUDA_MM_TW", "2"),
                                     ("DS4_CUDA_MM_TW", "2,DS4_CUDA_NO_PREQ=1"),
                                     ("DS4_CUDA_MF_TW", "1"), ("q2:DS4_CUDA_MF_TW", "1"), ("bf16:DS4_CUDA_MF_TW", "1"),
                                     ("DS4_CUDA_MM_LDM", "0"), ("q2:DS4_CUDA_MM_LDM", "0"),
                                     ("DS4_CUDA_MM_LDM", "0,DS4_CUDA_MM_TW=2"),
                                     ("DS4_CUDA_NO_ROUTE_GROUP", "1"), ("DS4_CUDA_NO_PDL", "1"), ("DS4_CUDA_NO_PREFETCH", "1"),
                                     ("DS4_CUDA_EARLY_TRIGGER", "1"), ("DS4_CUDA_NO_HC_FUSE", "1"),
                                     ("q2:DS4_CUDA_NO_MOE_FUSE", "1"), ("q4:DS4_CUDA_NO_MOE_FUSE", "1"),
                                     ("q2-wide:DS4_CUDA_NO_MOE_FUSE", "1"), ("DS4_CUDA_ROUTE_FUSE", "1"),
                                     ("q2:DS4_CUDA_ROUTE_FUSE", "1"), ("DS4_CUDA_NO_SIDE_STREAM", "1"),
                                     ("DS4_CUDA_NO_MV_FEW", "1"), ("q2:DS4_CUDA_NO_MV_FEW", "1"),
                                     ("q2:DS4_CUDA_MOE1_SEQ", "1"), ("q4:DS4_CUDA_MOE1_SEQ", "1"),
                                     ("q2:DS4_CUDA_XPF", "1"), ("DS4_CUDA_L2AHEAD", "15"),
                                     ("q2:DS4_CUDA_L2AHEAD", "15"),
                                     ("DS4_CUDA_NO_ATT_R4", "1"), ("q2:DS4_CUDA_NO_ATT_R4", "1"),
                                     ("DS4_CUDA_ATT_BFLY", "0"), ("q2:DS4_CUDA_ATT_BFLY", "0"),
                                     ("DS4_CUDA_ATT_BFLY", "0,DS4_CUDA_ATT_HB=1"), ("DS4_CUDA_ATT_BFLY", "0,DS4_CUDA_ATT_HB=2"),
                                     ("DS4_CUDA_ATT_BFLY", "0,DS4_CUDA_ATT_HB=16"),
                                     ("DS4_CUDA_IDX_FORK", "0"), ("q2:DS4_CUDA_IDX_FORK", "0"),
                                     ("q2:DS4_CUDA_NO_SIDE_STREAM", "1"),
                                     ("DS4_CUDA_MV_TALL", "0"), ("q2:DS4_CUDA_MV_TALL", "0"),
                                     ("DS4_CUDA_MV_TALL", "2,DS4_CUDA_MV_TALL_MIN=1"),
                                     ("DS4_CUDA_MV_TALL", "4,DS4_CUDA_MV_TALL_MIN=1"),
                                     ("q2:DS4_CUDA_MV_TALL", "4,DS4_CUDA_MV_TALL_MIN=1"),
                                     ("DS4_CUDA_NO_IDX_MMA", "1"), ("q2:DS4_CUDA_NO_IDX_MMA", "1"),
                                     ("DS4_CUDA_NO_TOPK_WIDE", "1"), ("DS4_CUDA_TOPK_ILP", "1"),
                                     ("DS4_CUDA_TOPK_ILP", "0"), ("DS4_CUDA_TOPK_ILP", "2"),
                                     ("q2:DS4_CUDA_TOPK_ILP", "1"), ("DS4_CUDA_NO_MERGE_SLICES", "1"),
                                     ("DS4_CUDA_ATT_HB_HCA", "0"), ("q2:DS4_CUDA_ATT_HB_HCA", "0"),
                                     ("DS4_CUDA_ATT_HB_HCA", "2"), ("DS4_CUDA_ATT_DH_RT", "1"),
                                     ("DS4_CUDA_KV_IN_MERGE", "0"), ("q2:DS4_CUDA_KV_IN_MERGE", "0"),
                                     ("DS4_CUDA_ATT_ZB", "4,DS4_CUDA_ATT_RH=0"), ("DS4_CUDA_ATT_ZB", "2,DS4_CUDA_ATT_RH=0"),
                                     ("DS4_CUDA_ATT_RH", "0"), ("q2:DS4_CUDA_ATT_RH", "0"),
                                     ("DS4_CUDA_ATT_RH", "0,DS4_CUDA_ATT_HB_HCA=16"), ("DS4_CUDA_ATT_HB", "8"),
                                     ("DS4_CUDA_COMB_HOST", "0"), ("q2:DS4_CUDA_COMB_HOST", "0"),
                                     ("DS4_CUDA_COMB_HOST", "0,DS4_CUDA_ROUTE_FUSE=1"),
                                     ("DS4_CUDA_COMB_BIG", "0"), ("q2:DS4_CUDA_COMB_BIG", "0"),
                                     ("DS4_CUDA_COMB_BIG", "0,DS4_CUDA_ROUTE_FUSE=1"),
                                     ("DS4_CUDA_EMIT_REG", "0"), ("q2:DS4_CUDA_EMIT_REG", "0"),
                                     ("DS4_CUDA_EMIT_REG", "0,DS4_CUDA_RING_IN_EMIT=0"),
                                     ("DS4_CUDA_IDX_PP", "1"), ("q2:DS4_CUDA_IDX_PP", "1"),
                                     ("DS4_CUDA_TAIL_TRIGGER", "1"), ("q2:DS4_CUDA_TAIL_TRIGGER", "1"),
                                     ("DS4_CUDA_TAIL_TRIGGER", "1,DS4_CUDA_COMB_BIG=0"),
                                     ("DS4_CUDA_TAIL_TRIGGER", "1,DS4_CUDA_ROUTE_FUSE=1"),
                                     ("DS4_CUDA_HC_BFLY", "0"), ("q2:DS4_CUDA_HC_BFLY", "0"),
                                     ("DS4_CUDA_ROUTE_REG", "0"), ("q2:DS4_CUDA_ROUTE_REG", "0"),
                                     ("DS4_CUDA_ROUTE_REG", "0,DS4_CUDA_ROUTE_FUSE=1"),
                                     ("DS4_CUDA_ROUTE_LANES", "0"), ("q2:DS4_CUDA_ROUTE_LANES", "0"),
                                     ("DS4_CUDA_ROUTE_LANES", "0,DS4_CUDA_ROUTE_FUSE=1"), ("q4:DS4_CUDA_ROUTE_LANES", "0"),
                                     ("DS4_CUDA_HC_WPRE", "0"), ("q2:DS4_CUDA_HC_WPRE", "0"),
                                     ("DS4_CUDA_HC_WPRE", "0,DS4_CUDA_NO_HC_FUSE=1"),
                                     ("DS4_CUDA_ROWNORM_REG", "0"), ("q2:DS4_CUDA_ROWNORM_REG", "0"),
                                     ("DS4_CUDA_HC_FIN2", "0"), ("q2:DS4_CUDA_HC_FIN2", "0"),
                                     ("DS4_CUDA_HC_FIN2", "0,DS4_CUDA_NO_HC_BATCH=1"),
                                     ("DS4_CUDA_HC_FIN3", "0"), ("q2:DS4_CUDA_HC_FIN3", "0"),
                                     ("DS4_CUDA_HC_FIN3", "0,DS4_CUDA_NO_HC_BATCH=1"),
                                     ("DS4_CUDA_HC_FIN2", "0,DS4_CUDA_HC_FIN3=0"), ("q2:DS4_CUDA_HC_FIN2", "0,DS4_CUDA_HC_FIN3=0"),
                                     ("DS4_CUDA_HC_FIN3", "2"), ("q2:DS4_CUDA_HC_FIN3", "4"),
                                     ("DS4_CUDA_HC_FIN3", "4,DS4_CUDA_NO_HC_BATCH=1"),
                                     ("DS4_CUDA_MERGE_REG", "0"), ("q2:DS4_CUDA_MERGE_REG", "0"),
                                     ("DS4_CUDA_MERGE_REG", "0,DS4_CUDA_NO_MERGE_SLICES=1"),
                                     ("DS4_CUDA_RING_IN_EMIT", "0"), ("q2:DS4_CUDA_RING_IN_EMIT", "0"),
                                     ("DS4_CUDA_HC_DIAG", "256"), ("DS4_CUDA_HC_DIAG", "256,DS4_CUDA_COMB_HOST=0")])
def test_cuda_ab_switches_keep_bits(var, val, tmp_path):
    """The A/B switches that docs/ARCHITECTURE.md section 7 says keep the results give the default run's bits:
    prefill of 80 tokens, token-by-token decode and chunks of 3 (the few-token kernels of MTP verify rows) on the
    flash stage model (release numerics; MODEL:VAR names another stage model, e.g. the q2 and q4 expert types for
    the fused few-token experts). Written after
    DS4_CUDA_ATT_HB=16 turned out to leave 8 of a block's 16 heads without their softmax."""
    name, _, var = var.rpartition(":")
    val, *more = val.split(",")  # VALUE,VAR2=VALUE2: switches that act together
    model = _stage_model(name or "flash")
    rng = np.random.default_rng(12)
    toks = tmp_path / "t.txt"
    toks.write_text(" ".join(str(x) for x in rng.integers(0, 300, 80)))
    if model not in _AB_BASE:  # the default run's prefill, once per model
        _AB_BASE[model], _ = run(model, toks, tmp_path / "p.f32", "--cuda", True, "--eval", "prefill")
    base = _AB_BASE[model]
    env = dict(os.environ, **{var: val}, **dict(m.split("=", 1) for m in more))
    for mode in (["--eval", "prefill"], ["--eval", "decode"], ["--eval", "chunk:3"], ["--eval", "chunk:4"]):
        got, _ = run(model, toks, tmp_path / "x.f32", "--cuda", True, *mode, env=env)
        d = float(np.abs(got.astype(np.float64) - base).max())
        print(f"\n{var}={val} {' '.join(mode)}: max |d| vs default prefill {d:.2e}")
        assert np.array_equal(got.view(np.uint32), base.view(np.uint32)), f"{var}={val} {mode} differs: {d:.2e}"


@pytest.mark.parametrize("name", ["flash", "q2"])
def test_cuda_blas_prefill_close(name, tmp_path):
    """DS4_CUDA_BLAS=1 (opt-in, other bits than the exact path): a batch's Q8_0 projections as cuBLAS FP16 GEMMs
    (src/cuda/mm_blas.cu). On a stage model (release numerics), prefill of 80 tokens with DS4_CUDA_BLAS_MIN=16:
    the path is taken (its stderr line; the logits differ from the exact path's); two runs give the same bits; the
    logits stay near the exact path's (max |d| below 2% of the largest logit; printed with the mean KL of the two
    softmaxes); every position whose exact top-1 leads its runner-up by more than 4x the median distance keeps its
    top-1; token-by-token decode (one token per launch: the exact kernels) is untouched, bit for bit."""
    model = _stage_model(name)
    rng = np.random.default_rng(13)
    toks = tmp_path / "t.txt"
    toks.write_text(" ".join(str(x) for x in rng.integers(0, 300, 80)))
    base, _ = run(model, toks, tmp_path / "p.f32", "--cuda", True, "--eval", "prefill")
    env = dict(os.environ, DS4_CUDA_BLAS="1", DS4_CUDA_BLAS_MIN="16")
    cmd = [DS4, "-m", str(model), "--cuda", "--prompt-tokens-file", str(toks), "--dump-logits", str(tmp_path / "a.f32"),
           "--eval", "prefill"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    assert "DS4_CUDA_BLAS=1: Q8_0 projections" in r.stderr, f"the cuBLAS path did not open:\n{r.stderr}"
    a = np.fromfile(tmp_path / "a.f32", dtype="<f4").reshape(base.shape)
    assert not np.array_equal(a.view(np.uint32), base.view(np.uint32)), "DS4_CUDA_BLAS=1 took the exact path"
    b, _ = run(model, toks, tmp_path / "b.f32", "--cuda", True, "--eval", "prefill", env=env)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), "DS4_CUDA_BLAS=1: two runs differ"
    dec, _ = run(model, toks, tmp_path / "d.f32", "--cuda", True, "--eval", "decode", env=env)
    assert np.array_equal(dec.view(np.uint32), base.view(np.uint32)), "DS4_CUDA_BLAS=1 changed one-token decode"
    a64, b64 = a.astype(np.float64), base.astype(np.float64)
    d = np.abs(a64 - b64).max(axis=1)
    scale = float(np.abs(b64).max())
    lp = b64 - b64.max(1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(1, keepdims=True))
    lq = a64 - a64.max(1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(1, keepdims=True))
    kl = float((np.exp(lp) * (lp - lq)).sum(1).mean())
    top2 = np.sort(b64, axis=1)[:, -2:]
    sure = (top2[:, 1] - top2[:, 0]) > 4 * np.median(d)
    same = a64.argmax(1) == b64.argmax(1)
    print(f"\n{name}: DS4_CUDA_BLAS=1 vs exact prefill: max |d| {d.max():.3e} (largest logit {scale:.2f}), "
          f"p50 {np.median(d):.2e}, mean KL {kl:.2e}, same top-1 at {same.mean():.1%} "
          f"({int(sure.sum())} positions with a clear lead)")
    assert d.max() <= 0.02 * scale, f"DS4_CUDA_BLAS=1 logits differ by {d.max():.3e} (scale {scale:.2f})"
    assert same[sure].all(), f"DS4_CUDA_BLAS=1 changed a clear top-1 at {np.nonzero(sure & ~same)[0].tolist()}"


# The modes of test_cuda_long_context_topk_bitwise: (eval, switches); each is its own test so that pytest-xdist
# spreads them over its workers (as one test the pair took ~100 s on one worker, the longest of make test-cuda)
_LONG_MODES = [
    ("chunk:4", {}),
    ("chunk:3", {"DS4_CUDA_NO_TOPK_WIDE": "1"}),  # one block per token (8 keys: the capacity is > 4,096 rows)
    ("chunk:3", {"DS4_CUDA_NO_TOPK_WIDE": "1", "DS4_CUDA_TOPK_ILP": "0"}),
    ("chunk:3", {"DS4_CUDA_NO_TOPK_WIDE": "1", "DS4_CUDA_TOPK_ILP": "2"}),  # 8 keys past 4,096 of the token's rows
    ("chunk:4", {"DS4_CUDA_TOPK_ILP": "0"}),
    ("prefill", {"DS4_CUDA_TOPK_ILP": "1"}),
    ("prefill", {"DS4_CUDA_TOPK_ILP": "0"}),
    ("chunk:4", {"DS4_CUDA_NO_MERGE_SLICES": "1"}),  # flash: 4 slices by default, ~40 splits per HCA head
    ("prefill", {"DS4_CUDA_KV_IN_MERGE": "0"}),  # kv_store, not the merge (which stores the last W of n > W rows)
    ("chunk:300", {"DS4_CUDA_KV_IN_MERGE": "0"}),
    ("chunk:4", {"DS4_CUDA_ATT_RH": "0"}),  # staged rows as f32, 16 heads per block in batches
    ("prefill", {"DS4_CUDA_ATT_RH": "0"}),
    # batches: 4 attention splits per block (16 heads per block: f32 staged rows); q2's stage model has 8 heads,
    # so no block of 16 heads and no looping kernel there
    ("prefill", {"DS4_CUDA_ATT_ZB": "4", "DS4_CUDA_ATT_RH": "0"}, "flash"),
    ("chunk:4", {"DS4_CUDA_ATT_ZB": "4", "DS4_CUDA_ATT_RH": "0"}, "flash"),
]
_LONG_BASE = {}


@pytest.mark.parametrize("name,mi", [(nm, i) for nm in ("q2", "flash") for i, m in enumerate(_LONG_MODES)
                                     if len(m) < 3 or m[2] == nm])
def test_cuda_long_context_topk_bitwise(name, mi, tmp_path):
    """Past 4,096 compressed rows (16k tokens) the indexer top-k of 1-4 tokens runs over several blocks per token
    that meet through global memory (k_idx_topk_wide); prefill takes the one-block kernel. So, bit for bit, on a
    stage model (q2: 4 indexer heads, flash: 64; release numerics: the tensor-core scores): prefill of a long
    prompt == chunks of 4 (the wide kernel, with its graph replays) == chunks of 3 under DS4_CUDA_NO_TOPK_WIDE=1
    (the one-block kernel, 8 keys per thread: the capacity is past 4,096 rows), also with 1 key always
    (DS4_CUDA_TOPK_ILP=0) or chosen per token on the device (=2) == the wide kernel with 1 key == prefill with 8 /
    1 keys always == the attention merge in one block per head (DS4_CUDA_NO_MERGE_SLICES=1; by default dh / 128
    slices, many splits per head here) == the kv rows stored by kv_store (DS4_CUDA_KV_IN_MERGE=0; by default the merge
    stores them: one batch of n > W, chunks of 300 at pos0 > 0) == 4 attention splits per block (DS4_CUDA_ATT_ZB=4: the batch, and chunks of 4
    in the HCA layers, 16 heads per block from 2,048 rows of capacity)."""
    model = _stage_model(name)
    n = 20000 if name == "q2" else 17000  # up to 5,000 rows: two blocks
    rng = np.random.default_rng(5)
    toks = tmp_path / "t.txt"
    toks.write_text(" ".join(str(x) for x in rng.integers(0, 300, n)))
    if name not in _LONG_BASE:  # the default prefill, once per model and worker
        _LONG_BASE[name], _ = run(model, toks, tmp_path / "p.f32", "--cuda", True, "--eval", "prefill", "--ctx",
                                  "32768")
    base = _LONG_BASE[name]
    mode, sw = _LONG_MODES[mi][:2]
    got, _ = run(model, toks, tmp_path / "x.f32", "--cuda", True, "--eval", mode, "--ctx", "32768",
                 env=dict(os.environ, **sw))
    d = float(np.abs(got.astype(np.float64) - base).max())
    print(f"\n{name} --eval {mode} {sw}: max |d| vs prefill {d:.2e}")
    assert np.array_equal(got.view(np.uint32), base.view(np.uint32)), f"{mode} {sw} differs: {d:.2e}"


@pytest.mark.parametrize("mode,sw", [("chunk:4", {}), ("chunk:4", {"DS4_CUDA_NO_MERGE_SLICES": "1"}),
                                     ("prefill", {"DS4_CUDA_NO_ATT_FUSED": "1"}), ("prefill", {}),
                                     ("prefill", {"DS4_CUDA_ATT_FUSED_MAX_S": "16"})])
def test_cuda_long_context_att_online_bitwise(mode, sw, tmp_path):
    """The online merge with many splits per head (flash stage model, 17,000 tokens: ~40 splits per HCA head, so
    the merge's one-warp prefix maximum takes runs of 2 splits per lane): prefill all in k_attn_fused
    (DS4_CUDA_ATT_FUSED_MAX_S=1000) == chunks of 4 (k_attn_part + k_attn_merge<ON>, sliced and in one block per
    head) == prefill by k_attn_part + the online merge == prefill by the default threshold (fused where a layer's
    rows take at most 32 splits) and by a lower one, bit for bit."""
    model = _stage_model("flash")
    rng = np.random.default_rng(5)
    toks = tmp_path / "t.txt"
    toks.write_text(" ".join(str(x) for x in rng.integers(0, 300, 17000)))
    on = dict(os.environ, DS4_CUDA_ATT_ONLINE="1")
    fused = dict(on, DS4_CUDA_ATT_FUSED_MAX_S="1000")
    if "online" not in _LONG_BASE:
        _LONG_BASE["online"], _ = run(model, toks, tmp_path / "p.f32", "--cuda", True, "--eval", "prefill", "--ctx",
                                      "32768", env=fused)
    base = _LONG_BASE["online"]
    got, _ = run(model, toks, tmp_path / "x.f32", "--cuda", True, "--eval", mode, "--ctx", "32768", env=dict(on, **sw))
    d = float(np.abs(got.astype(np.float64) - base).max())
    print(f"\nflash --eval {mode} DS4_CUDA_ATT_ONLINE=1 {sw}: max |d| vs its prefill {d:.2e}")
    assert np.array_equal(got.view(np.uint32), base.view(np.uint32)), f"{mode} {sw} differs: {d:.2e}"


@pytest.mark.parametrize("name,release,off", [("q2-plain", False, ""), ("f32", False, ""), ("bf16", False, ""),
                                              ("q2", True, "act"), ("q4", True, "act"),
                                              ("q2", True, "fp8,fp4,f16"), ("q4", True, "fp8,fp4,f16")])
def test_cuda_quant_models_match_cpu(name, release, off, tmp_path):
    """Small models in the published type mixes, 80 positions + 24 greedy steps, CUDA vs CPU.

    Plain numerics: every position within 1e-4 of the largest logit and the same greedy ids.

    Release numerics, one family of roundings at a time (off=act: FP8/FP4/f16 only; off=fp8,fp4,f16: int8
    activations only): only the first position is asserted (within 1e-4), the rest is printed. Measured on the
    H200 (2026-12-03): the first 2-12 positions agree to ~1e-7, then the runs part. Each family rounds f32 values
    that the two backends sum in different orders, so a value next to a rounding midpoint can round the other way
    on one backend; on these random models with flat router and indexer scores such a difference soon changes a
    routing or top-k decision and the runs drift apart (the stage tests bound every stage on its own; with both
    families on, an attention output over one row is a probability times FP8 grid values whose ratios put int8
    codes exactly on ties, which is where test_cuda_release_numerics_diagnosis shows early drift)."""
    model = _stage_model(name)
    rng = np.random.default_rng(7)
    toks = tmp_path / "t.txt"
    toks.write_text(" ".join(str(x) for x in rng.integers(0, 300, 80)))
    extra = ["--numerics-off", off] if off else []
    gpu, g_out = run(model, toks, tmp_path / "g.f32", "--cuda", release, "--dump-greedy", "24", *extra)
    cpu, c_out = run(model, toks, tmp_path / "c.f32", "--cpu", release, "--dump-greedy", "24", *extra)
    scale = max(1.0, float(np.abs(cpu).max()))
    d = np.abs(gpu.astype(np.float64) - cpu).max(axis=1) / scale
    drift = int(np.argmax(d > 1e-4)) if (d > 1e-4).any() else len(d)
    print(f"\n{name} off [{off}]: cuda vs cpu max rel {d.max():.2e} p50 {np.median(d):.2e}; first position over "
          f"1e-4: {drift}; argmax agree {(gpu.argmax(1) == cpu.argmax(1)).mean():.1%}; per position (first 12): "
          + " ".join(f"{x:.0e}" for x in d[:12]) + f"\n  cpu {c_out.strip()}\n  gpu {g_out.strip()}")
    if not release:
        assert d.max() <= 1e-4
        assert g_out == c_out, "greedy continuations differ"
    else:
        assert d[0] <= 1e-4


@pytest.mark.parametrize("name", ["q2", "q4"])
def test_cuda_release_numerics_diagnosis(name, tmp_path):
    """Not an assertion: where CUDA and CPU part on the release path, by which rounding (each turned off alone)
    and after how many blocks. Printed for the notes."""
    model = _stage_model(name)
    rng = np.random.default_rng(7)
    toks = tmp_path / "t.txt"
    toks.write_text(" ".join(str(x) for x in rng.integers(0, 300, 24)))
    for off in ("", "act", "fp8", "fp8,fp4,f16", "fp4,f16,fp8,act"):
        for layers in (1, 2, 3, 0):
            extra = (["--numerics-off", off] if off else []) + (["--layers", str(layers)] if layers else [])
            g, _ = run(model, toks, tmp_path / "g.f32", "--cuda", True, *extra)
            c, _ = run(model, toks, tmp_path / "c.f32", "--cpu", True, *extra)
            d = np.abs(g.astype(np.float64) - c).max(axis=1) / max(1.0, float(np.abs(c).max()))
            print(f"\n{name} off [{off or '-':>15}] layers {layers or 'all'}: " + " ".join(f"{x:.0e}" for x in d[:16]))


def test_cuda_runs_are_bitwise_repeatable(ggufs, tmp_path):
    m = meta("h256_40_release") if "h256_40_release" in FIXTURES else meta(FIXTURES[0])
    model = ggufs(m["model"])
    toks = ORACLE / ("h256_40_release" if "h256_40_release" in FIXTURES else FIXTURES[0]) / "tokens.txt"
    a, _ = run(model, toks, tmp_path / "a.f32", "--cuda", True)
    b, _ = run(model, toks, tmp_path / "b.f32", "--cuda", True)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_cuda_demo_model_full_vocabulary(tmp_path):
    """The demo model (129,280-token head): plain numerics equal the CPU (1e-4, same greedy ids); release
    numerics: the GPU's first greedy id is the argmax of its own last prompt row (the GPU argmax kernel, the
    logits copy and the decode graphs agree), the same with DS4_CUDA_ARGMAX_VEC=0 (the scalar argmax; the default
    has 8 float4 loads in flight per thread); CPU differences printed (see
    test_cuda_quant_models_match_cpu)."""
    demo = ROOT / "build" / "demo.gguf"
    if not demo.exists():
        pytest.skip("build/demo.gguf missing")
    toks = tmp_path / "t.txt"
    toks.write_text("0 128803 100 200 300 128804")
    g, g_out = run(demo, toks, tmp_path / "g.f32", "--cuda", False, "--dump-greedy", "32")
    c, c_out = run(demo, toks, tmp_path / "c.f32", "--cpu", False, "--dump-greedy", "32")
    d = np.abs(g.astype(np.float64) - c).max() / max(1.0, float(np.abs(c).max()))
    print(f"\nplain: rel diff {d:.1e}\ncpu {c_out.strip()}\ngpu {g_out.strip()}")
    assert d <= 1e-4 and g_out == c_out
    g, g_out = run(demo, toks, tmp_path / "g.f32", "--cuda", True, "--dump-greedy", "32")
    c, c_out = run(demo, toks, tmp_path / "c.f32", "--cpu", True, "--dump-greedy", "32")
    d = np.abs(g.astype(np.float64) - c).max(axis=1) / max(1.0, float(np.abs(c).max()))
    print(f"release: per position rel diff {' '.join(f'{x:.1e}' for x in d)}\ncpu {c_out.strip()}\ngpu {g_out.strip()}")
    ids = g_out.split()[1:]
    assert len(ids) == 32 and int(ids[0]) == int(g[-1].argmax())
    # the scalar argmax (one load per step) picks the same ids as the default vector one
    v, v_out = run(demo, toks, tmp_path / "v.f32", "--cuda", True, "--dump-greedy", "32",
                   env=dict(os.environ, DS4_CUDA_ARGMAX_VEC="0"))
    assert v_out == g_out, f"DS4_CUDA_ARGMAX_VEC=0 changed the greedy ids\n{g_out}\n{v_out}"
    assert np.array_equal(v.view(np.uint32), g.view(np.uint32))


def test_cuda_cli_generates_text(tmp_path):
    """A one-shot generation through the CLI on the GPU (chat template, sampler, detokenizer)."""
    demo = ROOT / "build" / "demo.gguf"
    if not demo.exists():
        pytest.skip("build/demo.gguf missing")
    r = subprocess.run([DS4, "-m", str(demo), "--cuda", "-p", "hi", "-n", "8", "--temp", "0"],
                       capture_output=True, timeout=300)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 0, err
    assert "backend=cuda" in err and "generated 8" in err, err


def test_cuda_bad_device_is_a_clear_error(tmp_path):
    demo = ROOT / "build" / "demo.gguf"
    if not demo.exists():
        pytest.skip("build/demo.gguf missing")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([DS4, "-m", str(demo), "--cuda", "-p", "hi", "-n", "2"], capture_output=True, timeout=300,
                       env=env)
    err = r.stderr.decode("utf-8", "replace")
    print(err)
    assert r.returncode == 1 and "cuda" in err and "GPU" in err, err


# ---- MTP speculative decoding on the GPU (mtp_embed + the MTP block through the CUDA stages) -----------------

@pytest.mark.parametrize("fx", FIXTURES[:4])
def test_cuda_mtp_greedy_equals_plain_greedy(fx, ggufs, tmp_path):
    """Greedy with a random MTP block (mostly rejected drafts, every rollback path) equals greedy without it on
    the GPU, and the GPU picks the CPU's tokens with MTP on."""
    from test_mtp import make_mtp  # noqa: E402
    m = meta(fx)
    main = ggufs(m["model"])
    mtp = make_mtp(main, tmp_path / "mtp.gguf", seed=5)

    def greedy(backend, *extra):
        cmd = [DS4, "-m", str(main), backend, "--prompt-tokens-file", str(ORACLE / fx / "tokens.txt"),
               "--dump-logits", str(tmp_path / "l.f32"), "--dump-greedy", "16", *extra]
        if not m["release"]:
            cmd.append("--plain-numerics")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"
        line = [x for x in r.stdout.splitlines() if x.startswith("greedy:")][0]
        return [int(v) for v in line.split()[1:]], r.stderr

    ref, _ = greedy("--cuda")
    for nd in (1, 3):
        got, err = greedy("--cuda", "--mtp", str(mtp), "--mtp-draft", str(nd), "--mtp-gate", "0")
        assert got == ref, f"{fx}: CUDA greedy with --mtp-draft {nd} differs"
        assert "ds4: mtp:" in err and " drafts 0," not in err, err
    cpu, _ = greedy("--cpu", "--mtp", str(mtp), "--mtp-draft", "3", "--mtp-gate", "0")
    assert cpu == ref, f"{fx}: CPU and CUDA greedy with MTP differ"


# ---- layer split over GPUs (--gpus; docs/ARCHITECTURE.md "Several GPUs") -------------------------------------

def _n_gpus():
    r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(1 for x in r.stdout.splitlines() if x.startswith("GPU ")) if r.returncode == 0 else 0


@pytest.mark.parametrize("gpus,split", [("0,0", "2,3"), ("0,0,0,0,0", "1,1,1,1,1"), ("0,1", None), ("0,1", "4,1"),
                                        ("0,1,2,3", None), ("1,0,1", "1,2,2")])
def test_cuda_layer_split_bitwise(gpus, split, ggufs, tmp_path):
    """The blocks split over GPUs (a device may repeat: two parts on one GPU pass the HC states to themselves
    through NCCL), the HC states sent between parts with NCCL: logits equal one GPU's bit for bit in one
    prefill, token by token (graphs on, one per part) and in chunks of 3, then the same greedy continuation."""
    need = len(set(gpus.split(",")))
    have = _n_gpus()
    if have < need:
        pytest.skip(f"--gpus {gpus} needs {need} GPUs, {have} present")
    fx = "tiny_yarn_48_release"
    m = meta(fx)
    model = ggufs(m["model"])
    toks = ORACLE / fx / "tokens.txt"
    extra = ["--gpus", gpus] + (["--split", split] if split else [])
    for mode in ("prefill", "decode", "chunk:3"):
        one, one_out = run(model, toks, tmp_path / "a.f32", "--cuda", True, "--eval", mode, "--dump-greedy", "12")
        got, got_out = run(model, toks, tmp_path / "b.f32", "--cuda", True, "--eval", mode, "--dump-greedy", "12",
                           *extra)
        assert np.array_equal(one.view(np.uint32), got.view(np.uint32)), f"--gpus {gpus} {mode}: logits differ"
        assert one_out == got_out, f"--gpus {gpus} {mode}: greedy differs\n{one_out}\n{got_out}"


def test_cuda_layer_split_with_mtp(ggufs, tmp_path):
    """Two parts on one GPU with a random MTP block beside the last part: greedy with MTP (drafts, verify rows,
    rollback of both parts' rings) equals greedy on one GPU without it."""
    from test_mtp import make_mtp  # noqa: E402
    fx = "tiny_yarn_48_release"
    m = meta(fx)
    model = ggufs(m["model"])
    mtp = make_mtp(model, tmp_path / "mtp.gguf", seed=7)
    toks = ORACLE / fx / "tokens.txt"
    _, ref = run(model, toks, tmp_path / "a.f32", "--cuda", True, "--dump-greedy", "16")
    _, got = run(model, toks, tmp_path / "b.f32", "--cuda", True, "--dump-greedy", "16", "--gpus", "0,0",
                 "--split", "2,3", "--mtp", str(mtp), "--mtp-draft", "3", "--mtp-gate", "0")
    assert ref == got, f"{ref}\n{got}"


def test_cuda_layer_split_errors_are_clear(tmp_path):
    demo = ROOT / "build" / "demo.gguf"
    if not demo.exists():
        pytest.skip("build/demo.gguf missing")
    n = _n_gpus()
    r = subprocess.run([DS4, "-m", str(demo), "--gpus", f"0,{n}", "-p", "hi", "-n", "2"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and f"device {n} does not exist" in r.stderr, r.stderr
    env = dict(os.environ, DS4_NCCL_LIB="/nonexistent/libnccl.so.2")
    r = subprocess.run([DS4, "-m", str(demo), "--gpus", "0,0", "-p", "hi", "-n", "2"], capture_output=True,
                       text=True, timeout=300, env=env)
    print(r.stderr)
    # the fallback name (libnccl.so) may still load NCCL; either it works or it says why not
    assert r.returncode == 0 or "NCCL" in r.stderr, r.stderr
