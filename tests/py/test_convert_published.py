"""ds4-convert against the published tensor table and metadata (docs/FORMATS.md D.2, D.4).

The reference is ../shared/tools/synth_gguf.py, which states the published q2 / q4 files' tensor table (names, types,
dims, order) and metadata. Its table and keys are taken by running the script itself up to the point where it opens
its output (no data is written); nothing of it is restated here.

ds4-convert's side: a checkpoint in the official format with the full DeepSeek V4 Flash shapes (FLASH_CONFIG,
official names and dtypes: FP8 + 128x128 scales, FP4 experts + per-32 scales, BF16, F32 HC, I64 tid2eid) whose
shards are sparse files (headers only, data all holes: ~150 GB apparent, nothing on disk), converted with --dry-run,
which binds every tensor of the checkpoint and prints the table it would write. A second test shows that --dry-run
prints exactly the table of the file a real conversion writes (on a tiny official checkpoint).
"""
import builtins
import json
import os
import struct
import subprocess
import sys

import gguf
import numpy as np
import pytest

import official_ckpt as oc
from conftest import ROOT, SHARED, prog
from oracle_util import ORACLE

SYNTH = SHARED / "tools" / "synth_gguf.py"
TOKENIZER = ROOT / "tests" / "data" / "deepseek-v3-tokenizer.json"
GGML = {0: "F32", 1: "F16", 8: "Q8_0", 10: "Q2_K", 12: "Q4_K", 16: "IQ2_XXS", 26: "I32"}
VT = gguf.GGUFValueType


class _Stop(Exception):
    pass


def synth_reference(recipe):
    """Runs synth_gguf.py until it opens its output file for writing; returns its tensor table
    [(name, type name, ne)] and its metadata {key: (GGUFValueType, array element type or None, value)}."""
    real_open = builtins.open

    def guarded_open(path, mode="r", *a, **k):
        if "w" in mode:
            raise _Stop()
        return real_open(path, mode, *a, **k)

    ns = {"__name__": "synth_gguf", "__builtins__": dict(vars(builtins), open=guarded_open)}
    argv = sys.argv
    sys.argv = [str(SYNTH), "/nonexistent/out.gguf", recipe, str(TOKENIZER)]
    try:
        exec(compile(SYNTH.read_text(), str(SYNTH), "exec"), ns)
        raise AssertionError("synth_gguf.py did not open its output")
    except _Stop:
        pass
    finally:
        sys.argv = argv
    table = [(name, GGML[typ], list(ne)) for name, ne, typ, _ in ns["tensors"]]
    kv = {}
    for rec in ns["kv"]:
        key, val, end = _parse_kv(rec)
        assert end == len(rec), key
        kv[key] = val
    return table, kv


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _parse_kv(b, o=0):
    """One GGUF key/value record at byte o of b (A.3) -> (key, (GGUFValueType, array element type or None,
    value), end offset). Written from the format, independently of src/gguf.c and gguf-py (whose reader takes
    seconds over the tokenizer arrays)."""
    n = struct.unpack_from("<Q", b, o)[0]
    key = b[o + 8:o + 8 + n].decode()
    o += 8 + n
    vt = struct.unpack_from("<I", b, o)[0]
    o += 4

    def scalar(t, o):
        if t == 8:
            m = struct.unpack_from("<Q", b, o)[0]
            return b[o + 8:o + 8 + m].decode(), o + 8 + m
        return struct.unpack_from(_SCALAR[t], b, o)[0], o + struct.calcsize(_SCALAR[t])

    if vt != 9:
        v, o = scalar(vt, o)
        return key, (VT(vt), None, v), o
    et, cnt = struct.unpack_from("<IQ", b, o)
    o += 12
    vals = []
    for _ in range(cnt):
        v, o = scalar(et, o)
        vals.append(v)
    return key, (VT.ARRAY, VT(et), vals), o


def read_metadata(path):
    """{key: (type, element type, value)} and the tensor count of a GGUF file's header."""
    b = path.read_bytes()
    magic, version, n_t, n_kv = struct.unpack_from("<IIQQ", b, 0)
    assert magic == 0x46554747 and version == 3
    o, kv = 24, {}
    for _ in range(n_kv):
        key, val, o = _parse_kv(b, o)
        assert key not in kv, key
        kv[key] = val
    return kv, n_t


def write_sparse_st(path, tensors):
    """tensors: {name: (dtype, shape)} -> a safetensors file with a valid header and all-hole data."""
    header, off = {}, 0
    for name, (dt, shape) in tensors.items():
        n = int(np.prod(shape)) * {"F32": 4, "BF16": 2, "I64": 8, "I8": 1, "F8_E4M3": 1, "F8_E8M0": 1}[dt]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        f.truncate(8 + len(h) + off)


def official_dtypes(name, shape):
    """{stored name: (dtype, stored shape)} of one logical tensor in the official checkpoint (E.3)."""
    if ".ffn.experts." in name:                                   # FP4 E2M1, two codes a byte, ue8m0 per 32
        r, c = shape
        return {name: ("I8", (r, c // 2)), name[:-7] + ".scale": ("F8_E8M0", (r, c // 32))}
    if name == "head.weight" or (name.endswith(oc.FP8_SUFFIXES) and len(shape) == 2):
        r, c = shape
        return {name: ("F8_E4M3", shape), name[:-7] + ".scale": ("F8_E8M0", (-(-r // 128), -(-c // 128)))}
    if name.endswith("tid2eid"):
        return {name: ("I64", shape)}
    return {name: ("F32" if "hc_" in name else "BF16", shape)}


@pytest.fixture(scope="module")
def flash_shapes(tmp_path_factory):
    """The full-shape official checkpoint (sparse shards, one per layer), FLASH_CONFIG."""
    d = tmp_path_factory.mktemp("flash_shapes")
    cfg = oc.FLASH_CONFIG
    D, V, hc = cfg["hidden_size"], cfg["vocab_size"], cfg["hc_mult"]
    shards = [{"embed.weight": (V, D), "head.weight": (V, D), "norm.weight": (D,), "hc_head_fn": (hc, hc * D),
               "hc_head_base": (hc,), "hc_head_scale": (1,)}]
    for il in range(cfg["num_hidden_layers"]):
        shapes = oc.layer_shapes(il, cfg, cfg["compress_ratios"][il], il < cfg["num_hash_layers"])
        shards.append({f"layers.{il}.{k}": v for k, v in shapes.items()})
    wm = {}
    for k, sh in enumerate(shards):
        fn = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        stored = {}
        for name, shape in sh.items():
            stored.update(official_dtypes(name, shape))
        write_sparse_st(d / fn, stored)
        wm.update({n: fn for n in stored})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (d / "config.json").write_text(json.dumps(cfg))
    assert sum(os.stat(d / f).st_size for f in set(wm.values())) > 100e9        # the real sizes, as holes
    return d


def dry_run(hf_dir, recipe, meta_out=None, extra=()):
    cmd = [prog("ds4-convert"), "--hf", str(hf_dir), "--recipe", recipe, "--dry-run", *extra]
    if meta_out:
        cmd += ["-o", str(meta_out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    table = []
    for line in r.stdout.splitlines():
        name, typ, ne = line.split("\t")
        table.append((name, typ, [int(x) for x in ne.split(",")]))
    return table


@pytest.mark.parametrize("recipe", ["q2", "q4"])
def test_flash_shapes_table_equals_published(recipe, flash_shapes, tmp_path):
    """Names, types, dims and order of every tensor equal synth_gguf.py's table; the metadata has every key of
    synth_gguf.py with its value type and value (the tokenizer's synthetic padding strings and general.name
    aside)."""
    if not SYNTH.exists():
        pytest.skip(f"the reference {SYNTH} is not in this checkout")
    want, want_kv = synth_reference(recipe)
    meta = tmp_path / "meta.gguf"
    got = dry_run(flash_shapes, recipe, meta, extra=["--tokenizer", str(TOKENIZER), "--name", "x"])
    assert len(want) == 1328                          # D.1's count, as a check of the reference itself
    assert [t[0] for t in got] == [t[0] for t in want]
    for g, w in zip(got, want):
        assert g == w, (g, w)
    got_kv, n_tensors = read_metadata(meta)
    assert n_tensors == 0
    for key, (vt, et, val) in want_kv.items():
        assert key in got_kv, key
        gvt, get, got_v = got_kv[key]
        assert (gvt, get) == (vt, et), (key, gvt, get, vt, et)
        if key == "general.name":
            continue
        if vt != VT.ARRAY:
            assert got_v == val or (vt == VT.FLOAT32 and np.float32(got_v) == np.float32(val)), (key, got_v, val)
            continue
        assert len(got_v) == len(val), (key, len(got_v), len(val))
        if key == "tokenizer.ggml.tokens":            # synth pads with made-up strings; ours with [PADn] (D.5)
            pad = [i for i, s in enumerate(val) if s.startswith("<｜synthetic▁pad▁")]
            assert all(got_v[i] == f"[PAD{i}]" for i in pad)
            keep = sorted(set(range(len(val))) - set(pad))
            assert [got_v[i] for i in keep] == [val[i] for i in keep]
        elif et == VT.FLOAT32:
            assert np.array_equal(np.float32(got_v), np.float32(val)), key
        else:
            assert got_v == val, key


def test_dry_run_table_is_the_written_files_table(tmp_path):
    """On a tiny official checkpoint: --dry-run prints the main and MTP files' tables exactly as a conversion
    writes them (names, types, dims, order), for q2 and q4, and with --type-map."""
    d = tmp_path / "ckpt"
    oc.make(ORACLE / "models" / "h256", d)
    for recipe, extra in (("q2", ()), ("q4", ()), ("q2", ("--type-map", "blk.1.ffn_*_exps.weight=q4_K"))):
        out, mtp = tmp_path / "m.gguf", tmp_path / "mtp.gguf"
        table = dry_run(d, recipe, extra=("--mtp-out", str(mtp), *extra))
        r = subprocess.run([prog("ds4-convert"), "--hf", str(d), "-o", str(out), "--recipe", recipe,
                            "--mtp-out", str(mtp), *extra], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        written = []
        for p in (out, mtp):
            written += [(t.name, t.tensor_type.name, [int(x) for x in t.shape]) for t in gguf.GGUFReader(str(p)).tensors]
        assert table == written, recipe
        names = [t[0] for t in table]
        assert names[:6] == ["token_embd.weight", "output_norm.weight", "output.weight", "output_hc_base.weight",
                             "output_hc_fn.weight", "output_hc_scale.weight"]
