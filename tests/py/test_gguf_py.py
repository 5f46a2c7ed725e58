"""GGUF reader/writer cross-checks against gguf-py (PyPI `gguf`), and ds4-gguf.

* our writer (driven through ctypes on build/libds4.so) -> gguf-py's
  GGUFReader: every key, value type and value, every tensor's info and bytes;
* gguf-py's GGUFWriter -> our reader (`ds4-gguf --json --hash`): the same
  view as GGUFReader, tensor bytes compared by SHA-256;
* ds4-gguf prints gguf-py files, rejects the malformed corpus with exit 1 and
  one line (never a signal), and exits 2 on usage errors;
* make_bad_gguf.py reproduces the committed corpus byte for byte.
"""
import ctypes
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, data_path, prog

gguf = pytest.importorskip("gguf")
VT = gguf.GGUFValueType
QT = gguf.GGMLQuantizationType

# --------------------------------------------------------------- helpers


class Err(ctypes.Structure):
    _fields_ = [("code", ctypes.c_int), ("msg", ctypes.c_char * 512)]


PRODUCE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.POINTER(Err))


def libds4():
    path = ROOT / "build" / "libds4.so"
    if not path.exists():
        pytest.fail("build/libds4.so is not built (run make)")
    lib = ctypes.CDLL(str(path))
    vp, cp, i64, u64, u32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32
    lib.ds4_gguf_writer_new.restype = vp
    lib.ds4_gguf_writer_new.argtypes = []
    lib.ds4_gguf_writer_free.argtypes = [vp]
    scalar = {"u8": ctypes.c_uint8, "i8": ctypes.c_int8, "u16": ctypes.c_uint16, "i16": ctypes.c_int16,
              "u32": ctypes.c_uint32, "i32": ctypes.c_int32, "u64": ctypes.c_uint64, "i64": ctypes.c_int64,
              "f32": ctypes.c_float, "f64": ctypes.c_double, "bool": ctypes.c_bool}
    for name, ct in scalar.items():
        f = getattr(lib, "ds4_gguf_writer_add_" + name)
        f.argtypes = [vp, cp, ct]
        f.restype = ctypes.c_int
    lib.ds4_gguf_writer_add_str.argtypes = [vp, cp, cp, ctypes.c_size_t]
    lib.ds4_gguf_writer_add_arr.argtypes = [vp, cp, u32, vp, u64]
    lib.ds4_gguf_writer_add_arr_str.argtypes = [vp, cp, ctypes.POINTER(cp), ctypes.POINTER(ctypes.c_size_t), u64]
    lib.ds4_gguf_writer_add_tensor.argtypes = [vp, cp, u32, u32, ctypes.POINTER(i64), vp, u64]
    lib.ds4_gguf_writer_add_tensor.restype = i64
    lib.ds4_gguf_writer_add_tensor_cb.argtypes = [vp, cp, u32, u32, ctypes.POINTER(i64), PRODUCE, vp]
    lib.ds4_gguf_writer_add_tensor_cb.restype = i64
    lib.ds4_gguf_sink_write.argtypes = [vp, vp, ctypes.c_size_t, ctypes.POINTER(Err)]
    lib.ds4_gguf_writer_write_file.argtypes = [vp, cp, ctypes.POINTER(Err)]
    return lib


# numpy dtype of each array element type
NP = {VT.UINT8: np.uint8, VT.INT8: np.int8, VT.UINT16: np.uint16, VT.INT16: np.int16, VT.UINT32: np.uint32,
      VT.INT32: np.int32, VT.FLOAT32: np.float32, VT.BOOL: np.uint8, VT.UINT64: np.uint64, VT.INT64: np.int64,
      VT.FLOAT64: np.float64}
# ctypes adder of each scalar type
ADD = {VT.UINT8: "u8", VT.INT8: "i8", VT.UINT16: "u16", VT.INT16: "i16", VT.UINT32: "u32", VT.INT32: "i32",
       VT.FLOAT32: "f32", VT.BOOL: "bool", VT.UINT64: "u64", VT.INT64: "i64", VT.FLOAT64: "f64"}

# one scalar of every type, with edge values (expected as gguf-py decodes them)
SCALARS = [
    ("s.u8", VT.UINT8, 255), ("s.i8", VT.INT8, -128), ("s.u16", VT.UINT16, 65535), ("s.i16", VT.INT16, -32768),
    ("s.u32", VT.UINT32, 2**32 - 1), ("s.i32", VT.INT32, -2**31), ("s.f32", VT.FLOAT32, float(np.float32(0.1))),
    ("s.bool_t", VT.BOOL, True), ("s.bool_f", VT.BOOL, False), ("s.u64", VT.UINT64, 2**64 - 1),
    ("s.i64", VT.INT64, -2**63), ("s.f64", VT.FLOAT64, 1.0 / 3.0),
    ("s.str", VT.STRING, "DeepSeek V4 \u2014 \u00e9\u4e2d\U0001f600 \"q\"\n\t"), ("s.str_empty", VT.STRING, ""),
]
ARRAYS = [
    ("a.u8", VT.UINT8, [0, 1, 255]), ("a.i8", VT.INT8, [-128, 0, 127]), ("a.u16", VT.UINT16, [0, 65535]),
    ("a.i16", VT.INT16, [-32768, 32767]), ("a.u32", VT.UINT32, [0, 2**32 - 1, 7]),
    ("a.i32", VT.INT32, [-2**31, 2**31 - 1]), ("a.f32", VT.FLOAT32, [0.5, -1.25, float(np.float32(1e-30))]),
    ("a.bool", VT.BOOL, [True, False, True]), ("a.u64", VT.UINT64, [0, 2**64 - 1]),
    ("a.i64", VT.INT64, [-2**63, 2**63 - 1]), ("a.f64", VT.FLOAT64, [1e300, -5e-324, 0.1]),
    ("a.str", VT.STRING, ["", "a", "\u2581tok", "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "x" * 300]),
    ("a.i32_big", VT.INT32, list(range(-500, 1500))), ("a.empty", VT.INT32, []), ("a.str_empty", VT.STRING, []),
]


def tensor_specs(rng):
    """(name, ggml type, ne, bytes) for tensors of several types and ranks."""
    out = []
    for name, qt, ne in [("f32", QT.F32, [8, 3]), ("f16", QT.F16, [16]), ("bf16", QT.BF16, [4, 2, 2]),
                         ("q8_0", QT.Q8_0, [64, 3]), ("q4_k", QT.Q4_K, [256, 2]), ("q2_k", QT.Q2_K, [512]),
                         ("iq2_xxs", QT.IQ2_XXS, [256, 1, 2, 2]), ("i32", QT.I32, [5]),
                         ("blk.0.ffn_gate_exps.weight", QT.Q8_0, [32, 2, 3])]:
        be, bb = gguf.GGML_QUANT_SIZES[qt]
        n = ne[0] // be * bb * int(np.prod(ne[1:], dtype=np.int64))
        out.append((name, qt, ne, rng.integers(0, 256, n, dtype=np.uint8).tobytes()))
    return out


def field_view(reader):
    """{key: (type names, value)} of a GGUFReader, without its GGUF.* pseudo keys."""
    out = {}
    for k, f in reader.fields.items():
        if k.startswith("GGUF."):
            continue
        out[k] = ([t.name for t in f.types], f.contents())
    return out


def write_with_ours(lib, path, alignment, rng, streamed=()):
    """Writes SCALARS, ARRAYS and tensor_specs() with our writer; returns the specs."""
    w = lib.ds4_gguf_writer_new()
    keep = []  # ctypes buffers must outlive the write
    try:
        if alignment:
            assert lib.ds4_gguf_writer_add_u32(w, b"general.alignment", alignment) == 0
        for key, vt, v in SCALARS:
            if vt == VT.STRING:
                b = v.encode()
                rc = lib.ds4_gguf_writer_add_str(w, key.encode(), b, len(b))
            else:
                rc = getattr(lib, "ds4_gguf_writer_add_" + ADD[vt])(w, key.encode(), v)
            assert rc == 0, key
        for key, vt, v in ARRAYS:
            if vt == VT.STRING:
                bs = [s.encode() for s in v]
                strs = (ctypes.c_char_p * len(bs))(*bs)
                lens = (ctypes.c_size_t * len(bs))(*[len(b) for b in bs])
                rc = lib.ds4_gguf_writer_add_arr_str(w, key.encode(), strs, lens, len(bs))
            else:
                arr = np.array(v, dtype=NP[vt])
                keep.append(arr)
                rc = lib.ds4_gguf_writer_add_arr(w, key.encode(), int(vt), arr.ctypes.data, len(v))
            assert rc == 0, key
        specs = tensor_specs(rng)
        for name, qt, ne, data in specs:
            ne_c = (ctypes.c_int64 * len(ne))(*ne)
            if name in streamed:
                def produce(user, idx, sink, err, data=data):
                    for i in range(0, len(data), 100):  # in pieces
                        piece = data[i:i + 100]
                        rc = lib.ds4_gguf_sink_write(sink, piece, len(piece), err)
                        if rc:
                            return rc
                    return 0
                cb = PRODUCE(produce)
                keep.append(cb)
                idx = lib.ds4_gguf_writer_add_tensor_cb(w, name.encode(), int(qt), len(ne), ne_c, cb, None)
            else:
                buf = ctypes.create_string_buffer(data, len(data))
                keep.append(buf)
                idx = lib.ds4_gguf_writer_add_tensor(w, name.encode(), int(qt), len(ne), ne_c, buf, len(data))
            assert idx >= 0, name
        err = Err()
        rc = lib.ds4_gguf_writer_write_file(w, str(path).encode(), ctypes.byref(err))
        assert rc == 0, err.msg.decode()
        return specs
    finally:
        lib.ds4_gguf_writer_free(w)


def ds4_json(path):
    p = subprocess.run([prog("ds4-gguf"), str(path), "--json", "--hash"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def json_to_python(kv):
    """Our JSON value of one kv, decoded as gguf-py's contents() would give it."""
    def one(t, v):
        if t in ("FLOAT32", "FLOAT64") and isinstance(v, str):
            return float(v)
        if t == "UINT64" and isinstance(v, str):
            return int(v)
        return v
    if kv["type"] == "ARRAY":
        return ["ARRAY", kv["elem_type"]], [one(kv["elem_type"], x) for x in kv["value"]]
    return [kv["type"]], one(kv["type"], kv["value"])


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("alignment", [0, 64])
def test_gguf_py_reads_our_writer_every_type(tmp_path, alignment):
    lib = libds4()
    path = tmp_path / "ours.gguf"
    rng = np.random.default_rng(1234 + alignment)
    specs = write_with_ours(lib, path, alignment, rng, streamed=("q4_k", "blk.0.ffn_gate_exps.weight"))
    r = gguf.GGUFReader(str(path))
    got = field_view(r)
    expect = {}
    if alignment:
        expect["general.alignment"] = (["UINT32"], alignment)
    for key, vt, v in SCALARS:
        expect[key] = ([vt.name], v)
    for key, vt, v in ARRAYS:
        # gguf-py lists no element type for an empty array; its raw parts
        # (key len, key, type, elem type, count) still hold it
        expect[key] = (["ARRAY", vt.name] if v else ["ARRAY"], v)
        if not v:
            assert int(r.fields[key].parts[3][0]) == int(vt), key
    assert list(got) == list(expect)  # same keys, same order
    for k in expect:
        assert got[k][0] == expect[k][0], k
        assert got[k][1] == expect[k][1], k
    assert r.alignment == (alignment or 32)
    assert len(r.tensors) == len(specs)
    prev_end = None
    for t, (name, qt, ne, data) in zip(r.tensors, specs):
        assert t.name == name
        assert t.tensor_type == qt
        assert [int(x) for x in t.shape] == ne
        assert int(t.n_bytes) == len(data)
        assert np.asarray(t.data).tobytes() == data, name
        assert (t.data_offset - r.data_offset) % r.alignment == 0
        if prev_end is not None:  # packed in directory order (docs/FORMATS.md A.5)
            assert t.data_offset == prev_end
        al = r.alignment
        prev_end = t.data_offset + (len(data) + al - 1) // al * al
    assert prev_end == os.path.getsize(path)
    # and our reader agrees with itself on the same file
    j = ds4_json(path)
    assert [t["sha256"] for t in j["tensors"]] == [hashlib.sha256(d).hexdigest() for *_, d in specs]


def write_with_gguf_py(path, rng):
    """A GGUFWriter file with every value type, arrays and tensors of many types."""
    w = gguf.GGUFWriter(str(path), "deepseek4")
    for key, vt, v in SCALARS:
        w.add_key_value(key, v, vt)
    for key, vt, v in ARRAYS:
        if v:  # gguf-py refuses to write empty arrays
            w.add_key_value(key, v, VT.ARRAY, sub_type=vt)
    w.add_tensor("f32", rng.standard_normal((3, 8)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 16)).astype(np.float16))
    w.add_tensor("f64", rng.standard_normal(5))
    w.add_tensor("i8", rng.integers(-128, 127, 9, dtype=np.int8))
    w.add_tensor("i16", rng.integers(-999, 999, 9, dtype=np.int16))
    w.add_tensor("i32", rng.integers(-999, 999, (2, 2, 3), dtype=np.int32))
    w.add_tensor("i64", rng.integers(-999, 999, 4, dtype=np.int64))
    for name, qt, ne, data in tensor_specs(rng):
        if qt in (QT.F32, QT.F16, QT.I32):
            continue
        be, bb = gguf.GGML_QUANT_SIZES[qt]
        shape = list(reversed(ne[1:])) + [ne[0] // be * bb]  # numpy shape, bytes in the last dim
        w.add_tensor("q." + name, np.frombuffer(data, dtype=np.uint8).reshape(shape), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_py_writer_file_reads_identically_in_ours(tmp_path):
    path = tmp_path / "gguf_py.gguf"
    write_with_gguf_py(path, np.random.default_rng(7))
    r = gguf.GGUFReader(str(path))
    j = ds4_json(path)
    want = field_view(r)
    got = {kv["key"]: json_to_python(kv) for kv in j["kv"]}
    assert [kv["key"] for kv in j["kv"]] == list(want)
    for k in want:
        assert got[k][0] == want[k][0], k
        assert got[k][1] == want[k][1], k
    assert j["alignment"] == r.alignment
    assert j["data_offset"] == r.data_offset
    assert j["file_bytes"] == os.path.getsize(path)
    assert len(j["tensors"]) == len(r.tensors)
    for jt, t in zip(j["tensors"], r.tensors):
        assert jt["name"] == t.name
        assert jt["type_id"] == int(t.tensor_type)
        assert jt["type"] == t.tensor_type.name
        assert jt["ne"] == [int(x) for x in t.shape]
        assert jt["n_elems"] == int(t.n_elements)
        assert jt["n_bytes"] == int(t.n_bytes)
        assert j["data_offset"] + jt["offset"] == int(t.data_offset)
        assert jt["sha256"] == hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest(), t.name


def test_gguf_py_file_printed_by_ds4_gguf(tmp_path):
    path = tmp_path / "gguf_py.gguf"
    write_with_gguf_py(path, np.random.default_rng(8))
    p = subprocess.run([prog("ds4-gguf"), str(path)], capture_output=True, text=True)
    assert p.returncode == 0 and p.stderr == ""
    out = p.stdout
    r = gguf.GGUFReader(str(path))
    n_kv = len([k for k in r.fields if not k.startswith("GGUF.")])
    assert "* Dumping %d key/value pair(s)" % n_kv in out
    assert "* Dumping %d tensor(s)" % len(r.tensors) in out
    lines = out.splitlines()
    for k in r.fields:
        if not k.startswith("GGUF."):
            assert any((" | %s = " % k) in ln for ln in lines), k
    # scalar lines carry type and value; strings are escaped
    assert any(ln.endswith("| s.u32 = 4294967295") and "UINT32" in ln for ln in lines)
    assert any("| s.str = \"DeepSeek V4 \u2014 \u00e9\u4e2d\U0001f600 \\\"q\\\"\\n\\t\"" in ln for ln in lines)
    # long arrays are abbreviated, with their count
    big = [ln for ln in lines if "| a.i32_big = " in ln][0]
    assert "[INT32]" in big and "2000 |" in big and big.endswith(", ...]")
    for t in r.tensors:
        row = [ln for ln in lines if ln.split()[1:2] == [t.name]]
        assert len(row) == 1, t.name
        f = row[0].split()
        assert f[2] == t.tensor_type.name
        assert int(f[-1]) == int(t.n_bytes) and int(f[-2]) == int(t.data_offset) - r.data_offset


def bad_cases():
    out = []
    with open(data_path("gguf-bad", "MANIFEST.txt")) as f:
        for ln in f:
            if ln.startswith("#") or not ln.strip():
                continue
            name, frag = ln.rstrip("\n").split("\t")
            out.append((name, frag))
    return out


def test_ds4_gguf_rejects_malformed_corpus_with_one_line():
    cases = bad_cases()
    assert len(cases) >= 40
    for name, frag in cases:
        path = str(data_path("gguf-bad", name))
        p = subprocess.run([prog("ds4-gguf"), path], capture_output=True, text=True)
        assert p.returncode == 1, (name, p.returncode, p.stderr)  # negative would be a signal
        assert p.stdout == ""
        lines = p.stderr.splitlines()
        assert len(lines) == 1, (name, p.stderr)
        assert lines[0].startswith("ds4-gguf: %s: " % path), lines[0]
        assert frag in lines[0], (name, lines[0])


def test_ds4_gguf_rejects_truncated_gguf_py_file(tmp_path):
    src = tmp_path / "full.gguf"
    write_with_gguf_py(src, np.random.default_rng(9))
    data = src.read_bytes()
    r = gguf.GGUFReader(str(src))
    last = r.tensors[-1]
    end_of_data = int(last.data_offset) + int(last.n_bytes)
    cuts = sorted(set(list(range(0, 64)) + list(range(64, end_of_data, 37)) + [end_of_data - 1]))
    cut = tmp_path / "cut.gguf"
    for n in cuts:
        cut.write_bytes(data[:n])
        p = subprocess.run([prog("ds4-gguf"), str(cut)], capture_output=True, text=True)
        assert p.returncode == 1, (n, p.returncode, p.stderr)
        assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith("ds4-gguf: %s: " % cut), (n, p.stderr)


def test_ds4_gguf_usage_errors_exit_2(tmp_path):
    for args in ([], ["--bogus", "x.gguf"], ["a.gguf", "b.gguf"]):
        p = subprocess.run([prog("ds4-gguf")] + args, capture_output=True, text=True)
        assert p.returncode == 2, args
        assert "usage: ds4-gguf" in p.stderr
    p = subprocess.run([prog("ds4-gguf"), str(tmp_path / "missing.gguf")], capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "cannot open" in p.stderr


def test_make_bad_gguf_reproduces_committed_corpus(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "tests" / "py" / "make_bad_gguf.py"), str(tmp_path)], check=True)
    committed = sorted(os.listdir(data_path("gguf-bad")))
    assert sorted(os.listdir(tmp_path)) == committed
    for n in committed:
        assert (tmp_path / n).read_bytes() == data_path("gguf-bad", n).read_bytes(), n


def test_gguf_py_rejects_what_we_reject_where_it_checks():
    """Sanity of the corpus itself: gguf-py also refuses the cases it validates
    (bad magic, big-endian/other versions, duplicate tensor names, bad
    alignment), so those files are bad by an independent reader too."""
    for name in ["bad_magic", "version4", "tensor_duplicate", "alignment_48", "alignment_zero"]:
        with pytest.raises(Exception):
            gguf.GGUFReader(str(data_path("gguf-bad", name + ".gguf")))
