"""ds4-convert on checkpoints in the official format (docs/FORMATS.md E; tests/py/official_ckpt.py makes them):
FP8 E4M3 with 128x128 ue8m0 tiles, FP4 E2M1 experts with per-32 ue8m0 scales, official names, three shards
with an index, an MTP block.

Checked with gguf-py against the generator's own dequantization (written from the spec, not from src/quant.c):
every tensor bit for bit at f32 (main file and MTP file); the q8_0 / q4 / q2 recipes give the published types
of D.2 (Q8_0 bytes equal gguf-py's quantizer; Q4_K / Q2_K / IQ2_XXS within error bounds, printed); the same
bytes whatever the thread count; --type-map; the imatrix (.dat in, C.8 keys out, lower weighted error); and
damaged checkpoints refused with a message naming the tensor, file or key.
"""
import json
import shutil
import struct

import gguf
import numpy as np
import pytest

import official_ckpt as oc
from conftest import ROOT, prog
from oracle_util import (EXPERT, GLOBAL, LAYER, OFFICIAL_GLOBAL, ORACLE, convert, expected_tensors, in_small_tmpfs,
                         st_read)

QT = gguf.GGMLQuantizationType
INV_GLOBAL = {v: k for k, v in OFFICIAL_GLOBAL.items()}


def gguf_tensors(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def expected_main(deq):
    """GGUF name -> expected values, from the official names (mapped back to save_pretrained's for
    expected_tensors of oracle_util)."""
    return expected_tensors({INV_GLOBAL.get(n, n): (None, a) for n, a in deq.items() if not n.startswith("mtp.")})


MTP_ONLY = {"e_proj.weight": "e_proj.weight", "h_proj.weight": "h_proj.weight", "enorm.weight": "enorm.weight",
            "hnorm.weight": "hnorm.weight", "norm.weight": "norm.weight", "hc_head_fn": "hc_head_fn.weight",
            "hc_head_base": "hc_head_base.weight", "hc_head_scale": "hc_head_scale.weight"}


def expected_mtp(deq):
    """mtp.0.* GGUF name -> expected values (docs/FORMATS.md D.3)."""
    out, experts = {}, {}
    for n, a in deq.items():
        if not n.startswith("mtp.0."):
            continue
        suf = n[len("mtp.0."):]
        if suf.startswith("ffn.experts."):
            _, _, e, w, _ = suf.split(".")
            experts.setdefault("mtp.0." + EXPERT[w], {})[int(e)] = a
        else:
            out["mtp.0." + (MTP_ONLY.get(suf) or LAYER[suf])] = a
    for g, d in experts.items():
        out[g] = np.stack([d[i] for i in range(len(d))])
    return out


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """{key: (checkpoint dir, dequantized tensors)}: tiny_plain and tiny_yarn quantized from their weights,
    h256 from its weights and from raw random FP8/FP4 bytes (every code)."""
    d = tmp_path_factory.mktemp("official")
    out = {}
    for key, model, seed in (("tiny_plain", "tiny_plain", None), ("tiny_yarn", "tiny_yarn", None),
                             ("h256", "h256", None), ("h256_raw", "h256", 5)):
        out[key] = (d / key, oc.make(ORACLE / "models" / model, d / key, raw_seed=seed))
    return out


def test_generator_tables_match_spec_tables():
    """The generator's E4M3 / E2M1 decoders (formulas of E.3) agree with the spec's data tables."""
    bits = [int(x, 16) for x in (ROOT / "tests/data/tables/e4m3fn_to_f32.txt").read_text().split()]
    want = np.array(bits, dtype=np.uint32).view(np.float32)
    got = oc.e4m3_values()
    ok = ~np.isnan(want)
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(got[ok].view(np.uint32),
                                                                            want[ok].view(np.uint32))
    fp4 = np.array([float(x) for x in (ROOT / "tests/data/tables/fp4_e2m1.txt").read_text().split()],
                   dtype=np.float32)
    assert np.array_equal(oc.E2M1[:len(fp4)], fp4)


@pytest.mark.parametrize("key", ["tiny_plain", "tiny_yarn", "h256", "h256_raw"])
def test_official_f32_equals_official_dequantization_bit_for_bit(key, official, tmp_path):
    """--recipe f32: every GGUF tensor (main and MTP file) equals the official FP8/FP4/BF16 dequantization of
    the bytes in the shards, bit for bit."""
    d, deq = official[key]
    out, mtp = tmp_path / "m.gguf", tmp_path / "mtp.gguf"
    r = convert(d, out, "f32", extra=["--mtp-out", str(mtp)])
    assert r.returncode == 0, r.stderr
    assert "skipped" not in r.stderr  # the mtp.* tensors were not skipped: --mtp-out wrote them
    for path, want in ((out, expected_main(deq)), (mtp, expected_mtp(deq))):
        _, ts = gguf_tensors(path)
        assert set(ts) == set(want), set(ts) ^ set(want)
        for name, a in want.items():
            t = ts[name]
            assert list(t.shape) == list(reversed(a.shape)), name
            got = np.array(t.data).reshape(a.shape)
            if "tid2eid" in name:
                assert t.tensor_type == QT.I32 and np.array_equal(got, a.astype(np.int32)), name
            else:
                assert t.tensor_type == QT.F32, name
                assert np.array_equal(got.view(np.uint32), a.astype(np.float32).view(np.uint32)), name
    assert len(gguf_tensors(mtp)[1]) == 32                       # D.3: 32 tensors in the MTP file
    print(f"{key}: {len(expected_main(deq))} main + 32 MTP tensors bit-exact")


def test_official_equals_plain_f32_checkpoint_of_the_same_values(official, tmp_path):
    """The FP8/FP4 checkpoint and a plain F32 checkpoint holding its dequantized values convert to the same
    GGUF tensors and metadata (so the converted model's logits are the dequantized model's)."""
    d, deq = official["tiny_yarn"]
    ref = tmp_path / "ref"
    oc.write_f32_reference(deq, ORACLE / "models" / "tiny_yarn", ref)
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    for src, dst in ((d, a), (ref, b)):
        r = convert(src, dst, "q8_0", extra=["--name", "x"])
        assert r.returncode == 0, r.stderr
    ra, ta = gguf_tensors(a)
    rb, tb = gguf_tensors(b)
    assert [t.name for t in ra.tensors] == [t.name for t in rb.tensors]
    for n in ta:
        assert ta[n].tensor_type == tb[n].tensor_type and np.array_equal(np.array(ta[n].data), np.array(tb[n].data)), n
    ka = {k: f.contents() for k, f in ra.fields.items() if not k.startswith("GGUF.")}
    kb = {k: f.contents() for k, f in rb.fields.items() if not k.startswith("GGUF.")}
    assert ka == kb


# --- recipes (docs/FORMATS.md D.2) -------------------------------------------------------------------------------

F16_SUFFIXES = ("hc_attn_fn.weight", "hc_ffn_fn.weight", "ffn_gate_inp.weight", "attn_compressor_ape.weight",
                "attn_compressor_kv.weight", "attn_compressor_gate.weight", "indexer.attn_q_b.weight",
                "indexer.proj.weight", "indexer_compressor_ape.weight", "indexer_compressor_kv.weight",
                "indexer_compressor_gate.weight")
Q8_SUFFIXES = ("attn_q_a.weight", "attn_q_b.weight", "attn_kv.weight", "attn_output_a.weight",
               "attn_output_b.weight", "ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight")
EXPERT_TYPES = {"q8_0": (QT.Q8_0, QT.Q8_0), "q4": (QT.Q4_K, QT.Q4_K), "q2": (QT.IQ2_XXS, QT.Q2_K)}


def published_type(name, a, recipe):
    """The type D.2 gives a tensor (written from the table, independently of hf.c)."""
    if "tid2eid" in name:
        return QT.I32
    if a.ndim == 1:
        return QT.F32
    if name in ("token_embd.weight", "output_hc_fn.weight") or name.endswith(F16_SUFFIXES):
        return QT.F16
    if name == "output.weight" or name.endswith(Q8_SUFFIXES):
        return QT.Q8_0
    gu, down = EXPERT_TYPES[recipe]
    return down if name.endswith("ffn_down_exps.weight") else gu


def rel_rmse(got, want, w=None):
    w = np.ones_like(want) if w is None else w
    return float(np.sqrt(np.sum(w * (got - want) ** 2) / np.sum(w * want ** 2)))


@pytest.mark.parametrize("recipe", ["q8_0", "q4", "q2"])
def test_recipe_published_types_read_by_gguf_py(recipe, official, tmp_path):
    """h256 (rows of 256): the recipe's types per D.2, general.file_type, gguf-py dequantizes every tensor;
    Q8_0 equals gguf-py's quantizer byte for byte; K-quant / IQ2_XXS relative RMSE per class is bounded."""
    d, deq = official["h256"]
    out = tmp_path / "q.gguf"
    r = convert(d, out, recipe)
    assert r.returncode == 0, r.stderr
    rd, ts = gguf_tensors(out)
    assert rd.fields["general.file_type"].contents() == {"q8_0": 7, "q4": 15, "q2": 19}[recipe]
    # the official compress_ratios (MTP layer included) copied whole, as the published files have it (D.4)
    cfg = json.loads((d / "config.json").read_text())
    assert len(cfg["compress_ratios"]) == cfg["num_hidden_layers"] + 1
    assert list(rd.fields["deepseek4.attention.compress_ratios"].contents()) == cfg["compress_ratios"]
    want = expected_main(deq)
    assert set(ts) == set(want)
    errs = {}
    for name, a in want.items():
        t = ts[name]
        assert t.tensor_type == published_type(name, a, recipe), (name, t.tensor_type)
        if t.tensor_type in (QT.I32, QT.F32, QT.F16):
            continue
        raw = np.array(t.data)
        flat = a.astype(np.float32).reshape(-1, a.shape[-1])
        if t.tensor_type == QT.Q8_0:
            assert np.array_equal(raw.reshape(-1), gguf.quants.quantize(flat, QT.Q8_0).reshape(-1)), name
        got = gguf.quants.dequantize(raw.reshape(flat.shape[0], -1), t.tensor_type)
        errs.setdefault(t.tensor_type.name, []).append(rel_rmse(got, flat))
    bound = {"Q8_0": 0.01, "Q4_K": 0.12, "Q2_K": 0.45, "IQ2_XXS": 0.45}
    for ty, e in errs.items():
        print(f"{recipe}: {ty} relative RMSE max {max(e):.4f} mean {np.mean(e):.4f} over {len(e)} tensors")
        assert max(e) < bound[ty], (ty, e)


def test_recipe_same_bytes_for_any_thread_count(official, tmp_path):
    d, _ = official["h256"]
    outs = []
    for n in (1, 3):
        p = tmp_path / f"t{n}.gguf"
        r = convert(d, p, "q2", extra=["--threads", str(n), "--name", "x"])
        assert r.returncode == 0, r.stderr
        assert f"{n} threads" in r.stderr
        outs.append(p.read_bytes())
    assert outs[0] == outs[1]


def test_type_map_rules_and_refusals(official, tmp_path):
    d, _ = official["h256"]
    out = tmp_path / "tm.gguf"
    rules = tmp_path / "rules.txt"
    rules.write_text("# experts of layer 1 at Q4_K, the head F16\nblk.1.ffn_*_exps.weight q4_K\n"
                     "output.weight=f16\n")
    for spec in (str(rules), "blk.1.ffn_*_exps.weight=q4_K,output.weight=f16"):
        r = convert(d, out, "q2", extra=["--type-map", spec])
        assert r.returncode == 0, r.stderr
        _, ts = gguf_tensors(out)
        assert ts["blk.1.ffn_gate_exps.weight"].tensor_type == QT.Q4_K
        assert ts["blk.1.ffn_down_exps.weight"].tensor_type == QT.Q4_K
        assert ts["blk.0.ffn_gate_exps.weight"].tensor_type == QT.IQ2_XXS
        assert ts["output.weight"].tensor_type == QT.F16
    for spec, needle in (("nothing.*=q8_0", "matches no tensor"), ("output.weight=q5_K", "unknown type 'q5_k'"),
                         ("blk.0.attn_norm.weight=f16", "stays F32"), ("output.weight", "neither a readable file"),
                         ("blk.0.attn_q_b.weight=q4_K", "not whole Q4_K blocks")):
        r = convert(d, tmp_path / "bad.gguf", "q2", extra=["--type-map", spec], asan=True)
        assert r.returncode == 1 and needle in r.stderr, (spec, r.stderr)


def test_type_map_applies_to_the_mtp_file(official, tmp_path):
    """One rule set for both files: a rule naming mtp.0.* retypes the MTP file's tensors (values still the
    checkpoint's), a glob matching both retypes both, the rest of each file keeps its recipe types; an mtp.*
    rule without --mtp-out, or one matching an MTP vector, is refused."""
    d, deq = official["h256"]
    want = expected_mtp(deq)
    out, mtp = tmp_path / "m.gguf", tmp_path / "mtp.gguf"
    base_mtp = tmp_path / "mtp_base.gguf"
    r = convert(d, tmp_path / "base.gguf", "q2", extra=["--mtp-out", str(base_mtp)])
    assert r.returncode == 0, r.stderr
    _, tb = gguf_tensors(base_mtp)
    rules = "mtp.0.e_proj.weight=f16,mtp.0.ffn_down_exps.weight=q2_K,*.ffn_gate_exps.weight=q8_0"
    r = convert(d, out, "q2", extra=["--mtp-out", str(mtp), "--type-map", rules])
    assert r.returncode == 0, r.stderr
    _, tm = gguf_tensors(mtp)
    _, tmain = gguf_tensors(out)
    assert tm["mtp.0.e_proj.weight"].tensor_type == QT.F16
    a = want["mtp.0.e_proj.weight"]
    assert np.array_equal(np.array(tm["mtp.0.e_proj.weight"].data).reshape(a.shape), a.astype(np.float16))
    assert tm["mtp.0.ffn_down_exps.weight"].tensor_type == QT.Q2_K
    assert tm["mtp.0.ffn_gate_exps.weight"].tensor_type == QT.Q8_0
    a = want["mtp.0.ffn_gate_exps.weight"].astype(np.float32).reshape(-1, want["mtp.0.ffn_gate_exps.weight"].shape[-1])
    assert np.array_equal(np.array(tm["mtp.0.ffn_gate_exps.weight"].data).reshape(-1),
                          gguf.quants.quantize(a, QT.Q8_0).reshape(-1))
    assert tmain["blk.0.ffn_gate_exps.weight"].tensor_type == QT.Q8_0
    assert tmain["blk.0.ffn_down_exps.weight"].tensor_type == QT.Q2_K          # the q2 recipe's
    changed = {"mtp.0.e_proj.weight", "mtp.0.ffn_down_exps.weight", "mtp.0.ffn_gate_exps.weight"}
    for name, t in tb.items():                        # everything else as without the rules, bytes included
        if name not in changed:
            assert tm[name].tensor_type == t.tensor_type, name
            assert np.array_equal(np.array(tm[name].data), np.array(t.data)), name
    r = convert(d, tmp_path / "x.gguf", "q2", extra=["--type-map", "mtp.0.e_proj.weight=f16"], asan=True)
    assert r.returncode == 1 and "matches no tensor" in r.stderr and "need --mtp-out" in r.stderr, r.stderr
    r = convert(d, tmp_path / "x.gguf", "q2", extra=["--mtp-out", str(tmp_path / "y.gguf"), "--type-map",
                                                     "mtp.0.enorm.weight=f16"], asan=True)
    assert r.returncode == 1 and "stays F32" in r.stderr, r.stderr
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


# --- imatrix (docs/FORMATS.md C.6-C.8) -------------------------------------------------------------------------

def write_dat(path, entries, chunks=3, dataset="calib.txt", ncall=1):
    b = struct.pack("<i", len(entries))
    for name, vals in entries.items():
        nb = name.encode()
        b += struct.pack("<i", len(nb)) + nb + struct.pack("<ii", ncall, len(vals))
        b += np.asarray(vals, dtype="<f4").tobytes()
    ds = dataset if isinstance(dataset, bytes) else dataset.encode()
    b += struct.pack("<i", chunks) + struct.pack("<i", len(ds)) + ds
    path.write_bytes(b)


def test_imatrix_used_for_k_quants_with_c8_metadata(official, tmp_path):
    """A per-expert importance (ncall 2, values divided on load) for every routed expert stack: the Q4_K
    experts change, their importance-weighted error drops, and the C.8 keys are written."""
    d, deq = official["h256"]
    want = expected_main(deq)
    rng = np.random.default_rng(3)
    entries = {}
    for name, a in want.items():
        if "_exps." in name:
            n_exp, _, n_in = a.shape
            entries[name] = (np.exp(rng.standard_normal(n_exp * n_in) * 1.5) * 2).astype(np.float32)
    dat = tmp_path / "im.dat"
    write_dat(dat, entries, ncall=2)
    plain, weighted = tmp_path / "p.gguf", tmp_path / "w.gguf"
    assert convert(d, plain, "q4").returncode == 0
    r = convert(d, weighted, "q4", extra=["--imatrix", str(dat), "--imatrix-strict"])
    assert r.returncode == 0, r.stderr
    assert f"importance for {len(entries)} of" in r.stderr
    rw, tw = gguf_tensors(weighted)
    _, tp = gguf_tensors(plain)
    assert rw.fields["quantize.imatrix.file"].contents() == str(dat)
    assert rw.fields["quantize.imatrix.entries_count"].contents() == len(entries)
    assert rw.fields["quantize.imatrix.entries_count"].types[0] == gguf.GGUFValueType.UINT64
    assert rw.fields["quantize.imatrix.dataset"].contents() == "calib.txt"
    assert rw.fields["quantize.imatrix.chunks_count"].contents() == 3
    e_plain = e_w = 0.0
    for name, imp in entries.items():
        a = want[name].astype(np.float32)
        n_exp, n_out, n_in = a.shape
        wts = np.repeat((imp / 2).reshape(n_exp, 1, n_in), n_out, axis=1).reshape(-1, n_in)
        flat = a.reshape(-1, n_in)
        gp = gguf.quants.dequantize(np.array(tp[name].data).reshape(flat.shape[0], -1), QT.Q4_K)
        gw = gguf.quants.dequantize(np.array(tw[name].data).reshape(flat.shape[0], -1), QT.Q4_K)
        assert not np.array_equal(gp, gw), name
        e_plain += rel_rmse(gp, flat, wts) ** 2
        e_w += rel_rmse(gw, flat, wts) ** 2
        print(f"{name}: weighted relative RMSE {rel_rmse(gp, flat, wts):.4f} -> {rel_rmse(gw, flat, wts):.4f}")
    assert e_w < 0.9 * e_plain
    # non-expert tensors are unchanged
    for name in tp:
        if "_exps." not in name:
            assert np.array_equal(np.array(tp[name].data), np.array(tw[name].data)), name


def test_imatrix_refusals(official, tmp_path):
    d, deq = official["h256"]
    dat = tmp_path / "bad.dat"
    write_dat(dat, {"blk.1.ffn_gate_exps.weight": np.ones(5, dtype=np.float32)})
    r = convert(d, tmp_path / "x.gguf", "q4", extra=["--imatrix", str(dat)], asan=True)
    assert r.returncode == 1 and "'blk.1.ffn_gate_exps.weight' has 5 values" in r.stderr, r.stderr
    r = convert(d, tmp_path / "x.gguf", "q4", extra=["--imatrix", str(dat), "--imatrix-strict"], asan=True)
    assert r.returncode == 1 and "--imatrix-strict" in r.stderr, r.stderr
    good = np.ones(256, dtype=np.float32)
    write_dat(dat, {"blk.1.ffn_gate_exps.weight": good})
    raw = dat.read_bytes()
    for cut in (3, 10, 40, len(raw) - 5):
        dat.write_bytes(raw[:cut])
        r = convert(d, tmp_path / "x.gguf", "q4", extra=["--imatrix", str(dat)], asan=True)
        assert r.returncode == 1 and str(dat) in r.stderr and "Sanitizer" not in r.stderr, (cut, r.stderr)
    write_dat(dat, {"blk.1.ffn_gate_exps.weight": np.full(256, np.nan, dtype=np.float32)})
    r = convert(d, tmp_path / "x.gguf", "q4", extra=["--imatrix", str(dat)], asan=True)
    assert r.returncode == 1 and "finite" in r.stderr, r.stderr


def _imatrix_entries(want, seed=3):
    """Random per-expert importance (E * ncols values, expert-major) for every routed-expert stack."""
    rng = np.random.default_rng(seed)
    return {name: (np.exp(rng.standard_normal(a.shape[0] * a.shape[2]) * 1.5) * 2).astype(np.float32)
            for name, a in want.items() if "_exps." in name}


def _convert_bytes(d, tmp_path, dat, recipe="q2", extra=()):
    out = tmp_path / "im_out.gguf"
    r = convert(d, out, recipe, extra=["--imatrix", str(dat), "--name", "x", *extra])
    assert r.returncode == 0, r.stderr
    _, ts = gguf_tensors(out)
    return {n: np.array(t.data).tobytes() for n, t in ts.items()}, r.stderr


OFFICIAL_EXPERT_WORD = {"ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"}


def test_imatrix_name_forms_give_the_same_file(official, tmp_path):
    """The same importance written in each accepted naming gives byte-identical files: the packed GGUF name
    (ds4 --imatrix-out, llama-imatrix), per-expert 'G.expert.E' and 'G.expert_E' (ds4's quantizer, C.6), the
    checkpoint's per-expert names (layers.N.ffn.experts.E.w2.weight), and llama.cpp's scheduler-decorated
    'CUDA0#G#0'; and the importance is used (the file differs from one without it)."""
    d, deq = official["h256"]
    entries = _imatrix_entries(expected_main(deq))
    dat = tmp_path / "im.dat"
    write_dat(dat, entries, ncall=2)
    ref, err = _convert_bytes(d, tmp_path, dat)
    assert f"importance for {len(entries)} of" in err
    plain = tmp_path / "plain.gguf"
    assert convert(d, plain, "q2", extra=["--name", "x"]).returncode == 0
    _, tp = gguf_tensors(plain)
    assert all(ref[n] != np.array(tp[n].data).tobytes() for n in entries)
    forms = {
        "expert.E": lambda g, e, a: f"{g}.expert.{e}",
        "expert_E": lambda g, e, a: f"{g}.expert_{e}",
        "checkpoint": lambda g, e, a: "layers.%s.ffn.experts.%d.%s.weight" % (
            g.split(".")[1], e, OFFICIAL_EXPERT_WORD[g.split(".")[2]]),
    }
    for form, fn in forms.items():
        per = {}
        for g, v in entries.items():
            n_in = len(v) // 3
            for e in range(3):
                per[fn(g, e, v)] = v[e * n_in:(e + 1) * n_in]
        write_dat(dat, per, ncall=2)
        got, err = _convert_bytes(d, tmp_path, dat)
        assert got == ref, form
        assert "no tensor" not in err, (form, err)
    write_dat(dat, {f"CUDA0#{g}#0": v for g, v in entries.items()}, ncall=2)
    got, _ = _convert_bytes(d, tmp_path, dat)
    assert got == ref


def write_imatrix_gguf(path, sums, counts, datasets=("a.txt", "calib.txt"), chunks=7):
    """llama.cpp's GGUF imatrix layout (tools/imatrix save_imatrix): per entry NAME.in_sum2 F32 ne [ncols, n_mat],
    NAME.counts F32 ne [1, n_mat], NAME.in_sum; general.type imatrix, imatrix.datasets / chunk_count /
    chunk_size."""
    w = gguf.GGUFWriter(str(path), arch=None)
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", list(datasets))
    w.add_uint32("imatrix.chunk_count", chunks)
    w.add_uint32("imatrix.chunk_size", 512)
    for name in sorted(sums):
        s, c = sums[name], counts[name]
        w.add_tensor(f"{name}.in_sum2", s.astype(np.float32))
        w.add_tensor(f"{name}.counts", c.reshape(-1, 1).astype(np.float32))
        w.add_tensor(f"{name}.in_sum", np.sqrt(s).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_imatrix_gguf_format_equals_dat(official, tmp_path):
    """llama-imatrix's GGUF format: sums of squares and per-expert counts give the same file as a .dat of the
    means, a never-routed expert (count 0) counting as importance 1.0 (as llama-quantize does); the C.8 keys come
    from imatrix.chunk_count and the last dataset."""
    d, deq = official["h256"]
    entries = _imatrix_entries(expected_main(deq), seed=5)
    rng = np.random.default_rng(9)
    sums, counts, means = {}, {}, {}
    for g, v in entries.items():
        m = v.reshape(3, -1)
        c = rng.integers(1, 50, size=3).astype(np.float32)
        c[1] = 0 if g.startswith("blk.1.") else c[1]           # expert 1 of layer 1 never routed
        sums[g] = (m * c[:, None]).astype(np.float32)
        counts[g] = c
        with np.errstate(invalid="ignore", divide="ignore"):      # the mean as f32 sum / f32 count
            means[g] = np.where(c[:, None] > 0, sums[g] / c[:, None], 1.0).reshape(-1).astype(np.float32)
    gg, dat = tmp_path / "im.gguf", tmp_path / "im.dat"
    write_imatrix_gguf(gg, sums, counts)
    write_dat(dat, means, ncall=1)
    ref, _ = _convert_bytes(d, tmp_path, dat)
    out = tmp_path / "g.gguf"
    r = convert(d, out, "q2", extra=["--imatrix", str(gg), "--imatrix-strict", "--name", "x"])
    assert r.returncode == 0, r.stderr
    rd, ts = gguf_tensors(out)
    assert {n: np.array(t.data).tobytes() for n, t in ts.items()} == ref
    assert rd.fields["quantize.imatrix.dataset"].contents() == "calib.txt"
    assert rd.fields["quantize.imatrix.chunks_count"].contents() == 7
    assert rd.fields["quantize.imatrix.entries_count"].contents() == len(entries)
    # refused, naming the file and the entry: sums without counts, counts of the wrong length, a cut file
    g0 = sorted(sums)[0]
    for bad_counts, needle in ((None, f"'{g0}.in_sum2' needs an F32 '{g0}.counts'"),
                               (np.ones(2, np.float32), "one count per matrix (3)")):
        w = gguf.GGUFWriter(str(gg), arch=None)
        w.add_tensor(f"{g0}.in_sum2", sums[g0])
        if bad_counts is not None:
            w.add_tensor(f"{g0}.counts", bad_counts.reshape(-1, 1))
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
        r = convert(d, tmp_path / "x.gguf", "q2", extra=["--imatrix", str(gg)], asan=True)
        assert r.returncode == 1 and str(gg) in r.stderr and needle in r.stderr, r.stderr
    write_imatrix_gguf(gg, sums, counts)
    gg.write_bytes(gg.read_bytes()[:-100])
    r = convert(d, tmp_path / "x.gguf", "q2", extra=["--imatrix", str(gg)], asan=True)
    assert r.returncode == 1 and str(gg) in r.stderr and "Sanitizer" not in r.stderr, r.stderr


def test_imatrix_unknown_names_reported(official, tmp_path):
    """Entries that name no tensor of the model are listed by name and ignored (the rest is used as without
    them); a file none of whose entries names a tensor is refused; mtp.* entries serve the --mtp-out file and are
    reported as ignored without it; entries of tensors whose type takes no importance (Q8_0) are not unknown."""
    d, deq = official["h256"]
    entries = _imatrix_entries(expected_main(deq))
    dat = tmp_path / "im.dat"
    write_dat(dat, entries)
    ref, _ = _convert_bytes(d, tmp_path, dat)
    extra = {"blk.9.ffn_up_exps.weight": np.ones(256, np.float32), "model.norm": np.ones(4, np.float32),
             "blk.0.attn_q_a.weight": np.ones(256, np.float32)}
    write_dat(dat, {**entries, **extra})
    got, err = _convert_bytes(d, tmp_path, dat)
    assert got == ref
    assert f"2 of {len(entries) + 3} entries name no tensor" in err, err
    assert "'blk.9.ffn_up_exps.weight'" in err and "'model.norm'" in err and "attn_q_a" not in err, err
    write_dat(dat, {"layer.0.mlp.down": np.ones(256, np.float32), "foo": np.ones(3, np.float32)})
    r = convert(d, tmp_path / "x.gguf", "q2", extra=["--imatrix", str(dat)], asan=True)
    assert r.returncode == 1 and "none of its 2 entries names a tensor" in r.stderr, r.stderr
    assert "'foo'" in r.stderr and "'layer.0.mlp.down'" in r.stderr
    assert not (tmp_path / "x.gguf").exists()
    # the MTP block's experts: used for the --mtp-out file, ignored (and said so) without it
    mtp_imp = _imatrix_entries(expected_mtp(deq), seed=4)
    assert sorted(mtp_imp) == ["mtp.0.ffn_down_exps.weight", "mtp.0.ffn_gate_exps.weight", "mtp.0.ffn_up_exps.weight"]
    write_dat(dat, {**entries, **mtp_imp})
    got, err = _convert_bytes(d, tmp_path, dat)
    assert got == ref and f"{len(mtp_imp)} entries for the MTP block are ignored (no --mtp-out)" in err, err
    outs = {}
    for key, ent in (("with", {**entries, **mtp_imp}), ("without", entries)):
        write_dat(dat, ent)
        mtp = tmp_path / f"mtp_{key}.gguf"
        r = convert(d, tmp_path / "m.gguf", "q2", extra=["--imatrix", str(dat), "--mtp-out", str(mtp)])
        assert r.returncode == 0 and "no tensor" not in r.stderr, r.stderr
        _, ts = gguf_tensors(mtp)
        outs[key] = {n: np.array(t.data).tobytes() for n, t in ts.items()}
    for n in outs["with"]:
        assert (outs["with"][n] != outs["without"][n]) == ("_exps." in n), n


# --- damaged checkpoints ------------------------------------------------------------------------------------------

def _copy(official, tmp_path, key="tiny_plain"):
    src, _ = official[key]
    d = tmp_path / "dmg"
    shutil.copytree(src, d)
    return d


def _index(d):
    return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]


def _rewrite_shard(d, tensor, edit):
    """Rewrites the shard holding tensor with edit(dict of {name: (dtype, array)}) applied."""
    fn = _index(d)[tensor]
    raw = (d / fn).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    tensors = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        tensors[name] = (info["dtype"], np.frombuffer(raw[8 + n + b:8 + n + e], dtype=oc.ST_NP[info["dtype"]])
                         .reshape(info["shape"]))
    edit(tensors)
    oc.st_write_raw(d / fn, tensors)
    wm = _index(d)
    for name in list(wm):
        if wm[name] == fn and name not in tensors:
            del wm[name]
    for name in tensors:
        wm[name] = fn
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def _refused(d, tmp_path, *needles, extra=()):
    out = tmp_path / "x.gguf"
    r = convert(d, out, "q8_0", extra=extra, asan=True)
    assert r.returncode == 1 and "Sanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)
    assert not out.exists()
    print(r.stderr.strip().splitlines()[-1])


W = "layers.2.attn.wq_a.weight"
S = "layers.2.attn.wq_a.scale"
X = "layers.3.ffn.experts.1.w2.weight"
XS = "layers.3.ffn.experts.1.w2.scale"


def test_damaged_truncated_shard(official, tmp_path):
    d = _copy(official, tmp_path)
    fn = _index(d)[W]
    raw = (d / fn).read_bytes()
    (d / fn).write_bytes(raw[:len(raw) - 100])
    _refused(d, tmp_path, fn)


def test_damaged_missing_shard(official, tmp_path):
    d = _copy(official, tmp_path)
    fn = _index(d)[W]
    (d / fn).unlink()
    _refused(d, tmp_path, fn)


@pytest.mark.parametrize("which", ["fp8", "fp4"])
def test_damaged_wrong_scale_shape(which, official, tmp_path):
    d = _copy(official, tmp_path)
    w, s = (W, S) if which == "fp8" else (X, XS)
    _rewrite_shard(d, s, lambda t: t.__setitem__(s, ("F8_E8M0", np.concatenate([t[s][1], t[s][1]], axis=0))))
    _refused(d, tmp_path, f"scale tensor '{s}' has shape", w)


@pytest.mark.parametrize("which", ["fp8", "fp4"])
def test_damaged_missing_scale(which, official, tmp_path):
    d = _copy(official, tmp_path)
    w, s = (W, S) if which == "fp8" else (X, XS)
    _rewrite_shard(d, s, lambda t: t.pop(s))
    _refused(d, tmp_path, w, f"scale tensor '{s}' is missing")


def test_damaged_scale_wrong_dtype_and_orphan_scale(official, tmp_path):
    d = _copy(official, tmp_path)
    _rewrite_shard(d, S, lambda t: t.__setitem__(S, ("U8", t[S][1])))
    _refused(d, tmp_path, f"scale tensor '{S}' has dtype U8")
    d2 = tmp_path / "o"
    shutil.copytree(official["tiny_plain"][0], d2)
    _rewrite_shard(d2, W, lambda t: t.pop(W))
    _refused(d2, tmp_path, f"scale tensor '{S}' has no weight tensor")


def test_damaged_nan_scale(official, tmp_path):
    d = _copy(official, tmp_path)
    _rewrite_shard(d, S, lambda t: t.__setitem__(S, ("F8_E8M0", np.full_like(t[S][1], 255))))
    _refused(d, tmp_path, "attn_q_a.weight", "non-finite", "ue8m0 scale 255")


def test_damaged_missing_tensor(official, tmp_path):
    d = _copy(official, tmp_path)
    _rewrite_shard(d, "layers.1.ffn_norm.weight", lambda t: t.pop("layers.1.ffn_norm.weight"))
    _refused(d, tmp_path, "blk.1.ffn_norm.weight")


@pytest.mark.parametrize("dtype", ["F8_E5M2", "I16", "F4"])
def test_damaged_unknown_dtype(dtype, official, tmp_path):
    d = _copy(official, tmp_path)
    fn = _index(d)[W]
    raw = (d / fn).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    info = header[W]
    if dtype == "I16":                         # keep the byte count: half the columns
        info["shape"] = [info["shape"][0], info["shape"][1] // 2]
    info["dtype"] = dtype
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    (d / fn).write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])
    _refused(d, tmp_path, W, dtype)


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c.__setitem__("model_type", "deepseek_v3"), "model_type 'deepseek_v3'"),
    (lambda c: c.__setitem__("architectures", ["LlamaForCausalLM"]), "LlamaForCausalLM"),
    (lambda c: c["quantization_config"].__setitem__("weight_block_size", [64, 64]), "quantization_config"),
    (lambda c: c.__setitem__("expert_dtype", "fp2"), "expert_dtype 'fp2'"),
])
def test_damaged_not_this_architecture(edit, needle, official, tmp_path):
    d = _copy(official, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    _refused(d, tmp_path, needle)


def test_unknown_tensors_listed_and_skipped(official, tmp_path):
    """A tensor the engine has no use for (e.g. a later checkpoint's drafter): an error naming it, or with
    --skip-unknown a message naming it and a file identical to the one without it."""
    d = _copy(official, tmp_path)
    ref = tmp_path / "ref.gguf"
    assert convert(d, ref, "q8_0", extra=["--name", "x"]).returncode == 0
    extra = "drafter.layers.0.proj.weight"
    _rewrite_shard(d, W, lambda t: t.__setitem__(extra, ("BF16", np.zeros((4, 4), dtype=np.uint16))))
    _refused(d, tmp_path, f"cannot map tensor '{extra}'", "--skip-unknown")
    out = tmp_path / "skip.gguf"
    r = convert(d, out, "q8_0", extra=["--skip-unknown", "--name", "x"])
    assert r.returncode == 0, r.stderr
    assert f"skipping '{extra}'" in r.stderr
    assert out.read_bytes() == ref.read_bytes()


def test_mtp_out_needs_mtp_tensors(official, tmp_path):
    d = _copy(official, tmp_path)
    wm = _index(d)
    for fn in sorted(set(wm.values())):
        _rewrite_shard(d, next(n for n in wm if wm[n] == fn),
                       lambda t: [t.pop(n) for n in list(t) if n.startswith("mtp.")])
    r = convert(d, tmp_path / "m.gguf", "q8_0", extra=["--mtp-out", str(tmp_path / "mtp.gguf")], asan=True)
    assert r.returncode == 1 and "--mtp-out" in r.stderr and "mtp.0." in r.stderr, r.stderr
    assert not (tmp_path / "mtp.gguf").exists() and not (tmp_path / "m.gguf").exists()   # refused before any output


def test_recipe_kl_vs_f32_on_sharp_fixture(tmp_path):
    """KL(f32 || recipe) of the next-token distributions on the quantization-acceptance fixture (h256_sharp,
    96 tokens, a trained-LM-like sharp output), all four files converted from the same official-format
    checkpoint, plain numerics (only the weights differ); printed for the closing note. The KL grows as the
    experts get coarser and q8_0's stays small. (test_oracle's >= 98% top-1 bound for q8_0 is calibrated on the
    fixture's original bf16 weights; after the FP8/FP4 rounding of this checkpoint, the head included, q8_0
    keeps 93/96 top-1 tokens: printed, not asserted.)"""
    import subprocess
    d = tmp_path / "sharp"
    oc.make(ORACLE / "models" / "h256_sharp", d)
    tokens = ORACLE / "h256_sharp_96" / "tokens.txt"
    logits = {}
    for recipe in ("f32", "q8_0", "q4", "q2"):
        g = tmp_path / f"{recipe}.gguf"
        r = convert(d, g, recipe)
        assert r.returncode == 0, r.stderr
        out = tmp_path / f"{recipe}.f32"
        r = subprocess.run([prog("ds4"), "-m", str(g), "--cpu", "--plain-numerics", "--prompt-tokens-file",
                            str(tokens), "--dump-logits", str(out)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        logits[recipe] = np.fromfile(out, dtype="<f4").reshape(96, 256).astype(np.float64)

    def logp(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    ref = logp(logits["f32"])
    kl, top1 = {}, {}
    for recipe in ("q8_0", "q4", "q2"):
        q = logp(logits[recipe])
        kl[recipe] = float(np.mean(np.sum(np.exp(ref) * (ref - q), axis=1)))
        top1[recipe] = float(np.mean(ref.argmax(1) == q.argmax(1)))
        print(f"h256_sharp_96 {recipe}: mean KL(f32 || {recipe}) = {kl[recipe]:.5f}, top-1 agreement "
              f"{100 * top1[recipe]:.1f}%")
    assert kl["q8_0"] < 0.02
    assert kl["q8_0"] < kl["q4"] < kl["q2"]


# --- whole tensors against ggml's quantizers ---------------------------------------------------------------------

GOLDEN = ROOT / "tests" / "data" / "quant_golden"


def test_whole_expert_tensors_byte_identical_to_ggml_golden(tmp_path):
    """A checkpoint whose routed experts 0 and 1 of layer 0 are the golden inputs of tests/data/quant_golden
    (4 x 1024 rows each, made by ggml's ggml_quantize_chunk), with their golden importance vectors in a .dat:
    the converter's whole expert stacks (two experts, chunked, threaded) equal ggml's bytes for Q4_K with and
    without the imatrix, Q2_K and IQ2_XXS with it."""
    cfg = dict(oc.FLASH_CONFIG)
    cfg.update(vocab_size=16, hidden_size=1024, num_hidden_layers=1, num_attention_heads=2, head_dim=64,
               qk_rope_head_dim=32, q_lora_rank=32, o_lora_rank=32, o_groups=1, moe_intermediate_size=4,
               n_routed_experts=2, num_experts_per_tok=1, num_hash_layers=0, compress_ratios=[0],
               index_n_heads=2, index_head_dim=64, index_topk=2, sliding_window=4, num_nextn_predict_layers=0)
    rng = np.random.default_rng(0)
    tensors = {}
    shapes = {"embed.weight": (16, 1024), "head.weight": (16, 1024), "norm.weight": (1024,),
              "hc_head_fn": (4, 4096), "hc_head_base": (4,), "hc_head_scale": (1,)}
    shapes.update({f"layers.0.{k}": v for k, v in oc.layer_shapes(0, cfg, 0, False).items()})
    for n, sh in shapes.items():
        tensors[n] = ("F32", (rng.standard_normal(sh) * 0.05).astype(np.float32))
    dists = ("gauss", "heavy")
    rows = {dist: np.fromfile(GOLDEN / f"{dist}_input.f32", dtype="<f4").reshape(4, 1024) for dist in dists}
    imat = {dist: np.fromfile(GOLDEN / f"{dist}_imatrix.f32", dtype="<f4") for dist in dists}
    for e, dist in enumerate(dists):
        tensors[f"layers.0.ffn.experts.{e}.w1.weight"] = ("F32", rows[dist])
        tensors[f"layers.0.ffn.experts.{e}.w3.weight"] = ("F32", rows[dist])
    d = tmp_path / "golden"
    d.mkdir()
    oc.st_write_raw(d / "model.safetensors", tensors)
    (d / "config.json").write_text(json.dumps(cfg))
    dat = tmp_path / "golden.dat"
    both = np.concatenate([imat["gauss"], imat["heavy"]])
    write_dat(dat, {"blk.0.ffn_gate_exps.weight": both, "blk.0.ffn_up_exps.weight": both})

    def golden(kind):
        return b"".join((GOLDEN / f"{dist}_{kind}.bin").read_bytes() for dist in dists)

    cases = [("q4", [], {"gate": "q4_K_plain", "up": "q4_K_plain"}),
             ("q4", ["--imatrix", str(dat)], {"gate": "q4_K_imatrix", "up": "q4_K_imatrix"}),
             ("q2", ["--imatrix", str(dat), "--type-map", "blk.0.ffn_up_exps.weight=q2_K"],
              {"gate": "iq2_xxs_imatrix", "up": "q2_K_imatrix"})]
    for recipe, extra, want in cases:
        out = tmp_path / "g.gguf"
        r = convert(d, out, recipe, extra=extra + ["--threads", "2"])
        assert r.returncode == 0, r.stderr
        _, ts = gguf_tensors(out)
        for proj, kind in want.items():
            got = np.array(ts[f"blk.0.ffn_{proj}_exps.weight"].data).tobytes()
            assert got == golden(kind), (recipe, extra, proj, kind)


def test_output_write_failure_leaves_nothing(official, tmp_path):
    """A file-size limit (ulimit -f): ds4-convert ignores SIGXFSZ itself (no trap in the shell), so write() fails
    with EFBIG, the run exits 1 naming the file and the cause, and neither the output nor a temporary file is
    left (killed by the signal, it would leave the temporary file)."""
    import subprocess
    d, _ = official["h256"]
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "x.gguf"
    exe = ROOT / "build" / "asan" / "ds4-convert"
    cmd = f"ulimit -f 512; exec {exe} --hf {d} -o {out} --recipe q8_0"
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300,
                       env={"ASAN_OPTIONS": "detect_leaks=0:exitcode=86", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 1 and "file too large writing" in r.stderr and str(out) in r.stderr, r.stderr
    assert "File too large" in r.stderr
    assert list(outdir.iterdir()) == []


def test_full_disk_fails_clearly_and_leaves_nothing(official, tmp_path):
    """A real ENOSPC: the output directory is a 1 MiB tmpfs and the q2 file is ~1.9 MiB. The run exits 1 with
    "disk full" naming the output file, and the filesystem is left empty (the temporary file removed)."""
    d, _ = official["h256"]
    exe = ROOT / "build" / "asan" / "ds4-convert"
    r = in_small_tmpfs(tmp_path, 1024, f"{exe} --hf {d} -o $FS/x.gguf --recipe q2")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "disk full writing" in r.stderr and "/fs/x.gguf" in r.stderr and "No space left" in r.stderr, r.stderr
    assert "Sanitizer" not in r.stderr
    assert "LISTING: \n" in r.stdout or r.stdout.strip() == "LISTING:", r.stdout


def test_full_disk_on_the_mtp_file(official, tmp_path):
    """The disk fills while the MTP file is written (the main file, ~1.9 MiB, fits in 2.5 MiB; the MTP file does
    not): exit 1 naming --mtp-out and "disk full"; the main file is complete (gguf-py reads it, the same bytes as
    a conversion without --mtp-out) and no temporary file is left."""
    d, _ = official["h256"]
    ref = tmp_path / "ref.gguf"
    assert convert(d, ref, "q2", extra=["--name", "x"]).returncode == 0
    exe = ROOT / "build" / "asan" / "ds4-convert"
    keep = tmp_path / "kept.gguf"
    r = in_small_tmpfs(tmp_path, 2560, f"{exe} --hf {d} -o $FS/x.gguf --recipe q2 --name x --mtp-out $FS/mtp.gguf;"
                        f" rc=$?; cp $FS/x.gguf {keep}; (exit $rc)")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "--mtp-out" in r.stderr and "disk full writing" in r.stderr and "mtp.gguf" in r.stderr, r.stderr
    assert r.stdout.split("LISTING:")[1].split() == ["x.gguf"], r.stdout
    assert keep.read_bytes() == ref.read_bytes()


# --- interrupted conversions -----------------------------------------------------------------------------------


def _interrupt_when(tmp_path, d, sig, tmp_glob, extra=()):
    """Runs build/asan/ds4-convert --recipe q2 on d into tmp_path/out/x.gguf, slowed by --debug-chunk-delay-ms
    (68 + 32 tensors of at least one chunk each: seconds), sends sig once a file matching tmp_glob exists in the
    output directory and 0.2 s more passed (some tensors written), and returns (exit status, stderr, out dir)."""
    import os
    import signal as sg
    import subprocess
    import time
    from oracle_util import ASAN_ENV
    outdir = tmp_path / "out"
    outdir.mkdir()
    exe = ROOT / "build" / "asan" / "ds4-convert"
    p = subprocess.Popen([str(exe), "--hf", str(d), "-o", str(outdir / "x.gguf"), "--recipe", "q2", "--name", "x",
                          "--debug-chunk-delay-ms", "40", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=dict(os.environ, **ASAN_ENV))
    deadline = time.monotonic() + 120
    while not list(outdir.glob(tmp_glob)):
        assert p.poll() is None, ("finished before the signal", p.returncode, p.stderr.read())
        assert time.monotonic() < deadline, "no temporary file appeared"
        time.sleep(0.005)
    time.sleep(0.2)
    assert p.poll() is None, ("finished before the signal", p.returncode, p.stderr.read())
    p.send_signal(getattr(sg, sig))
    _, err = p.communicate(timeout=120)
    return p.returncode, err, outdir


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_signal_during_conversion_leaves_nothing(sig, official, tmp_path):
    """Ctrl+C (SIGINT), SIGTERM or SIGHUP (a closed terminal) while the tensors are being written: the run stops within a chunk, exits
    128 + N with a message naming the signal and the output, and leaves neither the output nor its temporary
    file (the handler only sets a flag; the producer fails the write and the writer removes the file)."""
    import signal as sg
    d, _ = official["h256"]
    rc, err, outdir = _interrupt_when(tmp_path, d, sig, "x.gguf.tmp.*")
    assert rc == 128 + getattr(sg, sig), (rc, err)
    assert f"interrupted by {sig}: {outdir / 'x.gguf'} not written" in err, err
    assert "Sanitizer" not in err and "runtime error" not in err, err
    assert list(outdir.iterdir()) == []


def test_an_unhandled_signal_during_conversion_leaves_no_temporary_file(official, tmp_path):
    """A signal the converter does not stop on (SIGUSR1 ends the process) still takes the unfinished output with
    it (an OUT.tmp.* file was left)."""
    import signal as sg
    d, _ = official["h256"]
    rc, err, outdir = _interrupt_when(tmp_path, d, "SIGUSR1", "x.gguf.tmp.*")
    assert rc == -sg.SIGUSR1, (rc, err)
    assert "the unfinished output was removed" in err, err
    assert list(outdir.iterdir()) == []


def test_an_input_truncated_during_conversion_leaves_no_temporary_file(official, tmp_path):
    """A shard truncated while it is being converted (a download still running, a disk cleaned up) faults its
    mapping (SIGBUS): the process says so and leaves no OUT.tmp.* file (it died silently, leaving one)."""
    import os
    import shutil
    import signal as sg
    import subprocess
    import time
    from oracle_util import ASAN_ENV
    src, _ = official["h256"]
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    outdir = tmp_path / "out"
    outdir.mkdir()
    p = subprocess.Popen([str(ROOT / "build" / "asan" / "ds4-convert"), "--hf", str(d), "-o", str(outdir / "x.gguf"),
                          "--recipe", "q2", "--name", "x", "--debug-chunk-delay-ms", "40"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=dict(os.environ, **ASAN_ENV))
    deadline = time.monotonic() + 120
    while not list(outdir.glob("x.gguf.tmp.*")):
        assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()
        time.sleep(0.005)
    time.sleep(0.2)
    for f in d.glob("*.safetensors"):
        os.truncate(f, 0)
    _, err = p.communicate(timeout=120)
    assert p.returncode == -sg.SIGBUS, (p.returncode, err)
    assert "shrank while being read" in err and "the unfinished output was removed" in err, err
    assert list(outdir.iterdir()) == []


def test_signal_during_the_mtp_file_keeps_the_complete_main_file(official, tmp_path):
    """SIGINT while the --mtp-out file is written: the main file, already complete, is kept (the same bytes as a
    conversion without --mtp-out); the MTP file is not created and no temporary file is left; exit 130."""
    d, _ = official["h256"]
    ref = tmp_path / "ref.gguf"
    assert convert(d, ref, "q2", extra=["--name", "x"]).returncode == 0
    rc, err, outdir = _interrupt_when(tmp_path, d, "SIGINT", "mtp.gguf.tmp.*",
                                      extra=["--mtp-out", str(tmp_path / "out" / "mtp.gguf")])
    assert rc == 130, (rc, err)
    assert "x.gguf is complete; --mtp-out" in err and "mtp.gguf not written" in err, err
    assert sorted(p.name for p in outdir.iterdir()) == ["x.gguf"]
    assert (outdir / "x.gguf").read_bytes() == ref.read_bytes()


# --- values and configs the engine cannot use ------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["q8_0", "q4", "q2"])
def test_values_past_the_f16_block_scales_are_refused(recipe, official, tmp_path):
    """Finite expert weights of ~5e10 (a ue8m0 scale of 2^33) need a block scale past F16's 65504: the file had
    inf / NaN blocks that ds4 loaded into NaN logits (exit 0); now an error naming the tensor, matrix and row."""
    d = _copy(official, tmp_path)
    name = "layers.2.ffn.experts.0.w1.scale"
    _rewrite_shard(d, name, lambda t: t.__setitem__(name, ("F8_E8M0", np.full_like(t[name][1], 160))))
    out = tmp_path / "x.gguf"
    r = convert(d, out, recipe, asan=True)
    assert r.returncode == 1 and "Sanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr
    assert "blk.2.ffn_gate_exps.weight" in r.stderr and "matrix 0" in r.stderr, r.stderr
    assert "too large for the type's F16 block scales" in r.stderr, r.stderr
    assert not out.exists()


@pytest.mark.parametrize("key,value,needle", [
    ("rms_norm_eps", 1e-50, "rms_norm_eps"),            # 0 as F32
    ("hc_eps", 1e-46, "hc_eps"),
    ("routed_scaling_factor", 1e-47, "routed_scaling_factor"),
    ("rope_theta", 1.00000001, "rope_theta"),           # 1 as F32: outside (1, 1e12]
    ("swiglu_limit", 1e-50, "swiglu_limit"),
    ("partial_rotary_factor", -0.5, "partial_rotary_factor"),
    ("partial_rotary_factor", 1e30, "partial_rotary_factor"),
])
def test_config_values_are_checked_as_the_file_stores_them(key, value, needle, official, tmp_path):
    """The file stores these as F32: a value in range as a double but not as F32 was written, and ds4 refused the
    file it got (exit 0 from the converter); a partial_rotary_factor outside [0, 1] wrote a wrapped RoPE size."""
    d = _copy(official, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    if key == "partial_rotary_factor":
        cfg.pop("qk_rope_head_dim", None)
    (d / "config.json").write_text(json.dumps(cfg))
    _refused(d, tmp_path, needle)


def test_mtp_out_refuses_two_mtp_blocks(official, tmp_path):
    """num_nextn_predict_layers = 2 with --mtp-out wrote mtp.0 and mtp.1, a file the engine refuses (it runs one
    block): refused before any output."""
    d = _copy(official, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    r = convert(d, tmp_path / "m.gguf", "q8_0", extra=["--mtp-out", str(tmp_path / "mtp.gguf")], asan=True)
    assert r.returncode == 1 and "one MTP block" in r.stderr, r.stderr
    assert not (tmp_path / "mtp.gguf").exists() and not (tmp_path / "m.gguf").exists()


def test_index_naming_a_tensor_twice_and_a_dangling_tokenizer_are_refused(official, tmp_path):
    """An index whose weight_map names a tensor twice (it went by the last entry) and a tokenizer.json that is a
    link to nothing (the file was written with no tokenizer, silently) are errors."""
    import os
    d = _copy(official, tmp_path)
    ix = d / "model.safetensors.index.json"
    text = ix.read_text()
    wm = _index(d)
    first = next(iter(wm))
    ix.write_text(text.replace('"weight_map": {', '"weight_map": {"%s": "%s", ' % (first, wm[first]), 1))
    assert text != ix.read_text()
    _refused(d, tmp_path, "model.safetensors.index.json")
    ix.write_text(text)
    os.symlink("/nonexistent/tokenizer.json", d / "tokenizer.json")
    out = tmp_path / "t.gguf"
    r = convert(d, out, "q8_0")
    assert r.returncode == 1 and "tokenizer.json" in r.stderr and "link to nothing" in r.stderr, r.stderr
    assert not out.exists()


def test_imatrix_strings_that_are_not_utf8_are_written_escaped(official, tmp_path):
    """A GGUF string is UTF-8 (FORMATS A.1): an imatrix path or dataset name with other bytes went in raw (gguf-py
    then failed to read the key); now each such byte is written as \\xNN."""
    d, deq = official["h256"]
    dat = tmp_path / "im_\udcff.dat"  # the file name's byte 0xff
    write_dat(dat, _imatrix_entries(expected_main(deq)), dataset=b"caf\xe9\xff.txt")
    out = tmp_path / "x.gguf"
    import subprocess
    r = subprocess.run([prog("ds4-convert"), "--hf", str(d), "-o", str(out), "--outtype", "q4", "--imatrix", str(dat)],
                       capture_output=True, timeout=600)  # bytes: the messages name the path as it is
    assert r.returncode == 0, r.stderr
    rd, _ = gguf_tensors(out)
    assert rd.fields["quantize.imatrix.file"].contents().endswith("im_\\xff.dat")
    assert rd.fields["quantize.imatrix.dataset"].contents() == "caf\\xe9\\xff.txt"


def test_tokenizer_with_a_huge_id_is_refused_before_allocating(tmp_path):
    """An added token with id 2,000,000,000 made the converter allocate and pad two billion entries (5 GB and
    38 s for 10^8) before the vocabulary check; now refused at once, under a 2 GB address-space limit."""
    import resource
    import subprocess
    tj = json.loads((ROOT / "tests/data/deepseek-v3-tokenizer.json").read_text())
    tj["added_tokens"].append({"id": 2000000000, "content": "<evil>", "special": True})
    tok = tmp_path / "tok.json"
    tok.write_text(json.dumps(tj))
    out = tmp_path / "t.gguf"

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    r = subprocess.run([str(ROOT / "ds4-convert"), "--demo", "-o", str(out), "--tokenizer", str(tok)],
                       capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert r.returncode != 0 and "2000000000" in r.stderr and "past the largest id" in r.stderr, r.stderr
    assert not out.exists()


def test_sigquit_during_conversion_leaves_no_temporary_file(official, tmp_path):
    """SIGQUIT (Ctrl+\\) left OUT.tmp.*: it is now among the signals that remove it first."""
    import resource
    import signal as sg
    d, _ = official["h256"]
    core = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, core[1]))  # no core file from the child (inherited)
    try:
        rc, err, outdir = _interrupt_when(tmp_path, d, "SIGQUIT", "x.gguf.tmp.*")
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, core)
    assert rc == -sg.SIGQUIT, (rc, err)
    assert "the unfinished output was removed" in err, err
    assert list(outdir.iterdir()) == []
