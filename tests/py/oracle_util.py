"""Helpers shared by test_convert.py and test_oracle.py: a minimal safetensors reader/writer (numpy only), the
expected HF -> GGUF name mapping written from docs/MODEL.md B.2-B.3 (independently of tools/convert/hf.c), running
ds4-convert, and rewriting a GGUF with gguf-py to make damaged variants."""
import json
import os
import pathlib
import re
import struct
import subprocess

import numpy as np

from conftest import ROOT, prog

ORACLE = ROOT / "tests" / "data" / "oracle"

ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "I32": np.int32,
             "F64": np.float64, "I8": np.int8, "U8": np.uint8}


def st_read(path):
    """{name: (dtype string, numpy array)}; BF16 comes back as float32 (exact), others as stored."""
    raw = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        a = np.frombuffer(raw[base + b:base + e], dtype=ST_DTYPES[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[name] = (info["dtype"], a)
    return out


def st_write(path, tensors):
    """tensors: {name: (dtype string, numpy array)} -> a safetensors file (BF16 arrays given as float32)."""
    header, blobs, off = {}, [], 0
    for name, (dt, a) in tensors.items():
        if dt == "BF16":
            b = (np.ascontiguousarray(a, dtype=np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        else:
            b = np.ascontiguousarray(a, dtype=ST_DTYPES[dt]).tobytes()
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


# --- expected mapping (docs/MODEL.md B.2 / B.3, "official name" column = save_pretrained's names) -------------------

GLOBAL = {"embed_tokens.weight": "token_embd.weight", "head.weight": "output.weight", "norm.weight": "output_norm.weight",
          "hc_head.hc_fn": "output_hc_fn.weight", "hc_head.hc_base": "output_hc_base.weight",
          "hc_head.hc_scale": "output_hc_scale.weight"}
LAYER = {
    "hc_attn_fn": "hc_attn_fn.weight", "hc_attn_scale": "hc_attn_scale.weight", "hc_attn_base": "hc_attn_base.weight",
    "attn_norm.weight": "attn_norm.weight", "attn.wq_a.weight": "attn_q_a.weight", "attn.q_norm.weight":
    "attn_q_a_norm.weight", "attn.wq_b.weight": "attn_q_b.weight", "attn.wkv.weight": "attn_kv.weight",
    "attn.norm.weight": "attn_kv_a_norm.weight", "attn.attn_sink": "attn_sinks.weight",
    "attn.wo_a.weight": "attn_output_a.weight", "attn.wo_b.weight": "attn_output_b.weight",
    "attn.compressor.ape": "attn_compressor_ape.weight", "attn.compressor.wkv.weight": "attn_compressor_kv.weight",
    "attn.compressor.wgate.weight": "attn_compressor_gate.weight",
    "attn.compressor.norm.weight": "attn_compressor_norm.weight",
    "attn.indexer.wq_b.weight": "indexer.attn_q_b.weight", "attn.indexer.weights_proj.weight": "indexer.proj.weight",
    "attn.indexer.compressor.ape": "indexer_compressor_ape.weight",
    "attn.indexer.compressor.wkv.weight": "indexer_compressor_kv.weight",
    "attn.indexer.compressor.wgate.weight": "indexer_compressor_gate.weight",
    "attn.indexer.compressor.norm.weight": "indexer_compressor_norm.weight",
    "hc_ffn_fn": "hc_ffn_fn.weight", "hc_ffn_scale": "hc_ffn_scale.weight", "hc_ffn_base": "hc_ffn_base.weight",
    "ffn_norm.weight": "ffn_norm.weight", "ffn.gate.weight": "ffn_gate_inp.weight", "ffn.gate.bias": "exp_probs_b.bias",
    "ffn.gate.tid2eid": "ffn_gate_tid2eid.weight", "ffn.shared_experts.w1.weight": "ffn_gate_shexp.weight",
    "ffn.shared_experts.w3.weight": "ffn_up_shexp.weight", "ffn.shared_experts.w2.weight": "ffn_down_shexp.weight",
}
EXPERT = {"w1": "ffn_gate_exps.weight", "w3": "ffn_up_exps.weight", "w2": "ffn_down_exps.weight"}

# save_pretrained suffix -> transformers' in-memory module name (docs/MODEL.md B.3 "HF parameter" column)
MODULE = {
    "hc_attn_fn": "attn_hc.fn", "hc_attn_scale": "attn_hc.scale", "hc_attn_base": "attn_hc.base",
    "attn_norm.weight": "input_layernorm.weight", "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight", "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight", "attn.norm.weight": "self_attn.kv_norm.weight",
    "attn.attn_sink": "self_attn.sinks", "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight", "attn.compressor.ape": "self_attn.compressor.position_bias",
    "attn.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
    "attn.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
    "attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "attn.indexer.compressor.ape": "self_attn.compressor.indexer.position_bias",
    "attn.indexer.compressor.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "attn.indexer.compressor.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "attn.indexer.compressor.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "hc_ffn_fn": "ffn_hc.fn", "hc_ffn_scale": "ffn_hc.scale", "hc_ffn_base": "ffn_hc.base",
    "ffn_norm.weight": "post_attention_layernorm.weight", "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias", "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
MODULE_GLOBAL = {"embed_tokens.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
                 "norm.weight": "model.norm.weight", "hc_head.hc_fn": "model.hc_head.hc_fn",
                 "hc_head.hc_base": "model.hc_head.hc_base", "hc_head.hc_scale": "model.hc_head.hc_scale"}
# save_pretrained global -> official checkpoint name (docs/FORMATS.md D.2 "HF source")
OFFICIAL_GLOBAL = {"embed_tokens.weight": "embed.weight", "head.weight": "head.weight", "norm.weight": "norm.weight",
                   "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale"}


def strip_model(name):
    return name[6:] if name.startswith("model.") else name


def expected_tensors(st):
    """From save_pretrained tensors: {gguf name: f32/int array in GGUF element order (numpy shape = reversed ne)}."""
    out, experts = {}, {}
    for name, (dt, a) in st.items():
        n = strip_model(name)
        if n in GLOBAL:
            out[GLOBAL[n]] = a
            continue
        m = re.match(r"layers\.(\d+)\.(.*)$", n)
        assert m, name
        il, suf = int(m.group(1)), m.group(2)
        e = re.match(r"ffn\.experts\.(\d+)\.(w[123])\.weight$", suf)
        if e:
            experts.setdefault(f"blk.{il}.{EXPERT[e.group(2)]}", {})[int(e.group(1))] = a
            continue
        assert suf in LAYER, name
        out[f"blk.{il}.{LAYER[suf]}"] = a
    for g, d in experts.items():
        out[g] = np.stack([d[i] for i in range(len(d))])
    return out


# Sanitizer settings for the ASan builds: a memory error or undefined behaviour
# exits with its own status (86) instead of the converter's 1.
ASAN_ENV = {"ASAN_OPTIONS": "detect_leaks=0:exitcode=86", "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}


def convert(hf_dir, out, outtype="f32", extra=(), asan=False):
    """Runs ds4-convert (asan: the build/asan one, as the damaged-input tests do)."""
    exe = str(ROOT / "build" / "asan" / "ds4-convert") if asan else prog("ds4-convert")
    env = dict(os.environ, **ASAN_ENV) if asan else None
    return subprocess.run([exe, "--hf", str(hf_dir), "-o", str(out), "--outtype", outtype, *extra],
                          capture_output=True, text=True, timeout=600, env=env)


def gguf_cache(d):
    """get(model, outtype="f32") -> the fixture model converted into directory d, once per (model, outtype)."""
    cache = {}

    def get(model, outtype="f32"):
        key = (model, outtype)
        if key not in cache:
            p = d / f"{model}-{outtype}.gguf"
            r = convert(ORACLE / "models" / model, p, outtype)
            assert r.returncode == 0, r.stderr
            cache[key] = p
        return cache[key]
    return get


def gguf_rewrite(src, dst, drop=(), tensor_fn=None, kv=None, drop_kv=()):
    """Copies GGUF src to dst with gguf-py, dropping tensors/keys, editing tensors
    (tensor_fn(name, qtype, array) -> (qtype, array) or None) and overriding keys (kv: {key: (value, GGUFValueType,
    sub_type)})."""
    import gguf
    r = gguf.GGUFReader(str(src))
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    w = gguf.GGUFWriter(str(dst), arch)
    kv = dict(kv or {})
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_kv:
            continue
        if key in kv:
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, f.contents(), vt, f.types[-1])
        else:
            w.add_key_value(key, f.contents(), vt)
    for key, (val, vt, sub) in kv.items():
        w.add_key_value(key, val, vt, sub)
    for t in r.tensors:
        if t.name in drop:
            continue
        qt = t.tensor_type
        data = np.array(t.data)
        if tensor_fn:
            res = tensor_fn(t.name, qt, data)
            if res is not None:
                qt, data = res
        w.add_tensor(t.name, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def small_tmpfs_dir(tmp_path):
    """tmp_path/fs, a directory to mount a small tmpfs on in a user + mount namespace (unshare -rm); skips the
    test where namespaces are not allowed."""
    import pytest
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no user/mount namespace for a small tmpfs: {probe.stderr.strip()}")
    fs = tmp_path / "fs"
    fs.mkdir()
    return fs


def in_small_tmpfs(tmp_path, kib, cmd):
    """Runs the shell command cmd with $FS a fresh tmpfs of kib KiB (a user + mount namespace: unshare -rm), then
    lists $FS (inside the namespace: the mount ends with it). Skips where namespaces are not allowed."""
    fs = small_tmpfs_dir(tmp_path)
    script = (f"mount -t tmpfs -o size={kib}k tmpfs {fs} || exit 99; FS={fs}; {cmd}; rc=$?; "
              f"echo \"LISTING:$(ls -A {fs} | tr '\\n' ' ')\"; exit $rc")
    return subprocess.run(["unshare", "-rm", "bash", "-c", script], capture_output=True, text=True, timeout=300,
                          env={"ASAN_OPTIONS": "detect_leaks=0:exitcode=86", "PATH": "/usr/bin:/bin"})
