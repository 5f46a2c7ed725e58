"""ds4-convert: HF directory -> GGUF in the published layout, checked with gguf-py against the safetensors files.

Covers: every tensor's name, dims, type and bytes for --outtype f32/f16/q8_0 (Q8_0 bit-exact with gguf-py's
quantizer), metadata from config.json, the three accepted name spellings (save_pretrained, transformers' module
names with fused experts, the official checkpoint's), sharded files with an index, and clear errors for bad input.
"""
import json
import os
import shutil
import subprocess

import gguf
import numpy as np
import pytest

from conftest import ROOT, prog
from oracle_util import (MODULE, MODULE_GLOBAL, OFFICIAL_GLOBAL, ORACLE, convert, expected_tensors, st_read,
                         st_write, strip_model)

MODELS = sorted(p.name for p in (ORACLE / "models").iterdir())
QT = gguf.GGMLQuantizationType


def load_gguf(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def kv(r, key):
    return r.fields[key].contents()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{(model, outtype): path of the converted GGUF}."""
    d = tmp_path_factory.mktemp("conv")
    out = {}
    for m in MODELS:
        for ot in ("f32", "f16", "q8_0"):
            p = d / f"{m}-{ot}.gguf"
            r = convert(ORACLE / "models" / m, p, ot)
            assert r.returncode == 0, r.stderr
            out[(m, ot)] = p
    return out


@pytest.mark.parametrize("model", MODELS)
def test_convert_f32_tensors_equal_safetensors_gguf_py(model, converted):
    st = st_read(ORACLE / "models" / model / "model.safetensors")
    want = expected_tensors(st)
    r, ts = load_gguf(converted[(model, "f32")])
    assert set(ts) == set(want), (set(ts) ^ set(want))
    for name, a in want.items():
        t = ts[name]
        assert list(t.shape) == list(reversed(a.shape)), name          # GGUF ne = reversed PyTorch shape
        if "tid2eid" in name:
            assert t.tensor_type == QT.I32
            assert np.array_equal(np.array(t.data).reshape(a.shape), a.astype(np.int32)), name
        else:
            assert t.tensor_type == QT.F32, name
            assert np.array_equal(np.array(t.data).reshape(a.shape), a.astype(np.float32)), name
    print(f"{model}: {len(ts)} tensors equal to the safetensors values")


@pytest.mark.parametrize("model", MODELS)
def test_convert_f16_and_q8_0_types_and_bytes_gguf_py(model, converted):
    st = st_read(ORACLE / "models" / model / "model.safetensors")
    want = expected_tensors(st)
    # Q8_0 under q8_0 (docs/MODEL.md B.5): attention projections, shared and routed experts, output head
    proj = {"attn_q_a.weight", "attn_q_b.weight", "attn_kv.weight", "attn_output_a.weight", "attn_output_b.weight",
            "ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight", "ffn_gate_exps.weight",
            "ffn_up_exps.weight", "ffn_down_exps.weight", "output.weight"}
    for ot in ("f16", "q8_0"):
        r, ts = load_gguf(converted[(model, ot)])
        assert kv(r, "general.file_type") == (1 if ot == "f16" else 7)
        for name, a in want.items():
            t = ts[name]
            if "tid2eid" in name:
                assert t.tensor_type == QT.I32
                continue
            if a.ndim == 1:                                               # vectors stay F32 (published recipe)
                assert t.tensor_type == QT.F32, name
                assert np.array_equal(np.array(t.data), a), name
                continue
            is_proj = name.split(".", 2)[-1] in proj if name.startswith("blk.") else name in proj
            if ot == "q8_0" and is_proj:
                assert t.tensor_type == QT.Q8_0, name
                ref = gguf.quants.quantize(a.astype(np.float32).reshape(-1, a.shape[-1]), QT.Q8_0)
                assert np.array_equal(np.array(t.data).reshape(ref.shape), ref), name     # bit-exact with gguf-py
            else:
                assert t.tensor_type == QT.F16, name
                got = np.array(t.data).reshape(a.shape)
                assert np.array_equal(got, a.astype(np.float16)), name


@pytest.mark.parametrize("model", MODELS)
def test_convert_metadata_from_config(model, converted):
    cfg = json.loads((ORACLE / "models" / model / "config.json").read_text())
    r, _ = load_gguf(converted[(model, "f32")])
    K = lambda k: kv(r, "deepseek4." + k)
    assert kv(r, "general.architecture") == "deepseek4"
    assert K("block_count") == cfg["num_hidden_layers"]
    assert K("embedding_length") == cfg["hidden_size"]
    assert K("vocab_size") == cfg["vocab_size"]
    assert K("attention.head_count") == cfg["num_attention_heads"]
    assert K("attention.key_length") == K("attention.value_length") == cfg["head_dim"]
    assert K("rope.dimension_count") == int(cfg["head_dim"] * cfg["partial_rotary_factor"])
    assert K("attention.q_lora_rank") == cfg["q_lora_rank"]
    assert K("attention.output_lora_rank") == cfg["o_lora_rank"]
    assert K("attention.output_group_count") == cfg["o_groups"]
    assert K("expert_count") == cfg["n_routed_experts"]
    assert K("expert_used_count") == cfg["num_experts_per_tok"]
    assert K("expert_feed_forward_length") == cfg["moe_intermediate_size"]
    assert K("hash_layer_count") == cfg["mlp_layer_types"].count("hash_moe")
    assert K("attention.sliding_window") == cfg["sliding_window"]
    assert K("attention.indexer.head_count") == cfg["index_n_heads"]
    assert K("attention.indexer.top_k") == cfg["index_topk"]
    rates = {"sliding_attention": 0, **cfg["compress_rates"]}
    # per-layer arrays cover the MTP layers too (sliding, ratio 0), as in the published files (D.3, D.4)
    n_mtp = cfg.get("num_nextn_predict_layers", 0)
    assert list(K("attention.compress_ratios")) == [rates[t] for t in cfg["layer_types"]] + [0] * n_mtp
    assert r.fields["deepseek4.attention.compress_ratios"].types[-1] == gguf.GGUFValueType.INT32
    assert np.allclose(K("swiglu_clamp_exp"), [cfg["swiglu_limit"]] * (cfg["num_hidden_layers"] + n_mtp))
    assert np.isclose(K("expert_weights_scale"), cfg["routed_scaling_factor"])
    assert K("expert_weights_norm") is True
    comp = cfg["rope_parameters"]["compress"]
    assert np.isclose(K("attention.compress_rope_freq_base"), comp["rope_theta"])
    assert np.isclose(K("rope.freq_base"), cfg["rope_parameters"]["main"]["rope_theta"])
    if comp["rope_type"] == "yarn":
        assert K("rope.scaling.type") == "yarn"
        assert np.isclose(K("rope.scaling.factor"), comp["factor"])
        assert K("rope.scaling.original_context_length") == comp["original_max_position_embeddings"]
        assert np.isclose(K("rope.scaling.yarn_beta_fast"), comp["beta_fast"])
        assert np.isclose(K("rope.scaling.yarn_beta_slow"), comp["beta_slow"])
    else:
        assert K("rope.scaling.type") == "none"
        assert "deepseek4.rope.scaling.factor" not in r.fields
    # types the published files use (docs/FORMATS.md D.4)
    assert r.fields["deepseek4.block_count"].types == [gguf.GGUFValueType.UINT32]
    assert r.fields["deepseek4.rope.freq_base"].types == [gguf.GGUFValueType.FLOAT32]


def _copy_config(src, dst):
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")


def _tensor_bytes(path):
    r = gguf.GGUFReader(str(path))
    return {t.name: (int(t.tensor_type), list(t.shape), np.array(t.data).tobytes()) for t in r.tensors}


def test_convert_accepts_module_names_with_fused_experts(tmp_path, converted):
    """transformers' in-memory names (self_attn.q_a_proj, mlp.experts.gate_up_proj [E, 2F, D], ...) give the same
    tensors as save_pretrained's names."""
    model = "tiny_yarn"
    src = ORACLE / "models" / model
    st = st_read(src / "model.safetensors")
    out, experts = {}, {}
    for name, (dt, a) in st.items():
        n = strip_model(name)
        if n in MODULE_GLOBAL:
            out[MODULE_GLOBAL[n]] = (dt, a)
            continue
        il, suf = n.split(".", 2)[1:]
        if suf.startswith("ffn.experts."):
            _, _, e, w, _ = suf.split(".")
            experts.setdefault((il, w), {})[int(e)] = (dt, a)
            continue
        out[f"model.layers.{il}.{MODULE[suf]}"] = (dt, a)
    for il in sorted({k[0] for k in experts}):
        w1, w3, w2 = (experts[(il, w)] for w in ("w1", "w3", "w2"))
        n = len(w1)
        gate_up = np.stack([np.concatenate([w1[e][1], w3[e][1]]) for e in range(n)])   # gate rows first
        out[f"model.layers.{il}.mlp.experts.gate_up_proj"] = (w1[0][0], gate_up)
        out[f"model.layers.{il}.mlp.experts.down_proj"] = (w2[0][0], np.stack([w2[e][1] for e in range(n)]))
    d = tmp_path / "mod"
    _copy_config(src, d)
    st_write(d / "model.safetensors", out)
    r = convert(d, tmp_path / "mod.gguf")
    assert r.returncode == 0, r.stderr
    assert _tensor_bytes(tmp_path / "mod.gguf") == _tensor_bytes(converted[(model, "f32")])


def test_convert_accepts_official_names_and_sharded_index(tmp_path, converted):
    """The official checkpoint's spelling (no model. prefix, embed.weight, hc_head_fn, ...) split over two shards
    with a model.safetensors.index.json gives the same tensors."""
    model = "tiny_plain"
    src = ORACLE / "models" / model
    st = st_read(src / "model.safetensors")
    renamed = {}
    for name, v in st.items():
        n = strip_model(name)
        renamed[OFFICIAL_GLOBAL.get(n, n)] = v
    names = sorted(renamed)
    half = len(names) // 2
    d = tmp_path / "official"
    _copy_config(src, d)
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    wm = {}
    for fn, ns in shards.items():
        st_write(d / fn, {n: renamed[n] for n in ns})
        wm.update({n: fn for n in ns})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    r = convert(d, tmp_path / "off.gguf")
    assert r.returncode == 0, r.stderr
    assert _tensor_bytes(tmp_path / "off.gguf") == _tensor_bytes(converted[(model, "f32")])
    # an index entry whose tensor is not in its shard
    wm2 = dict(wm)
    wm2["layers.0.attn.wq_a.weight"] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm2}))
    r = convert(d, tmp_path / "bad.gguf", asan=True)
    assert r.returncode == 1 and "layers.0.attn.wq_a.weight" in r.stderr, r.stderr


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", "..", ".", "",
                                    7])
def test_convert_error_weight_map_outside_directory(tmp_path, target):
    """An index whose weight_map names a file outside the directory (or no file name at all) is refused with a
    message naming the entry; under ASan, so the message may not read freed JSON (issue 14)."""
    d = _doctored(tmp_path)
    (tmp_path / "outside.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    names = sorted(st_read(d / "model.safetensors"))
    wm = {n: "model.safetensors" for n in names}
    wm["model.norm.weight"] = target
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    _fails(d, tmp_path, "weight_map entry 'model.norm.weight' is not a file name in")


def _doctored(tmp_path, edit_st=None, edit_cfg=None, model="tiny_yarn"):
    src = ORACLE / "models" / model
    d = tmp_path / "doc"
    d.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    if edit_cfg:
        edit_cfg(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    st = st_read(src / "model.safetensors")
    if edit_st:
        edit_st(st)
    st_write(d / "model.safetensors", st)
    return d


def _fails(d, tmp_path, *needles):
    """Damaged input: the ASan/UBSan converter exits 1 with a message naming each needle."""
    out = tmp_path / "x.gguf"
    r = convert(d, out, asan=True)
    assert r.returncode == 1 and "Sanitizer" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)
    assert not out.exists()
    print(r.stderr.strip())


def test_convert_error_missing_config_key(tmp_path):
    _fails(_doctored(tmp_path, edit_cfg=lambda c: c.pop("q_lora_rank")), tmp_path, "q_lora_rank")


def test_convert_error_bad_schedule_and_rope(tmp_path):
    d = _doctored(tmp_path, edit_cfg=lambda c: c.pop("layer_types"))
    _fails(d, tmp_path, "layer_types")
    shutil.rmtree(d)
    d = _doctored(tmp_path, edit_cfg=lambda c: c["rope_parameters"]["compress"].update(attention_factor=1.277))
    _fails(d, tmp_path, "attention_factor")


def test_convert_error_unmappable_tensor(tmp_path):
    def edit(st):
        st["model.layers.1.attn.mystery.weight"] = ("F32", np.zeros((4, 4), np.float32))
    _fails(_doctored(tmp_path, edit), tmp_path, "model.layers.1.attn.mystery.weight", "cannot map")


def test_convert_error_tensor_in_wrong_layer_kind(tmp_path):
    def edit(st):   # a compressor in a sliding layer
        st["model.layers.0.attn.compressor.norm.weight"] = st["model.layers.2.attn.compressor.norm.weight"]
    _fails(_doctored(tmp_path, edit), tmp_path, "model.layers.0.attn.compressor.norm.weight", "blk.0.attn_compressor_norm")


def test_convert_error_missing_tensor(tmp_path):
    def edit(st):
        del st["model.layers.3.attn.wkv.weight"]
        del st["model.layers.4.ffn.experts.5.w3.weight"]
    _fails(_doctored(tmp_path, edit), tmp_path, "blk.3.attn_kv.weight", "blk.4.ffn_up_exps.weight (expert 5)")


def test_convert_error_wrong_shape(tmp_path):
    def edit(st):
        dt, a = st["model.layers.2.attn.wq_b.weight"]
        st["model.layers.2.attn.wq_b.weight"] = (dt, a[:-1])
    _fails(_doctored(tmp_path, edit), tmp_path, "model.layers.2.attn.wq_b.weight", "shape")


def test_convert_error_unsupported_dtype(tmp_path):
    def edit(st):
        dt, a = st["model.norm.weight"]
        st["model.norm.weight"] = ("F64", a.astype(np.float64))
    _fails(_doctored(tmp_path, edit), tmp_path, "model.norm.weight", "F64")


def test_convert_error_expert_id_out_of_range(tmp_path):
    def edit(st):
        dt, a = st["model.layers.1.ffn.gate.tid2eid"]
        a = a.copy()
        a[7, 1] = 8
        st["model.layers.1.ffn.gate.tid2eid"] = (dt, a)
    _fails(_doctored(tmp_path, edit), tmp_path, "blk.1.ffn_gate_tid2eid.weight", "token 7")


@pytest.mark.parametrize("damage", ["truncated", "header_len", "json", "offsets"])
def test_convert_error_malformed_safetensors(tmp_path, damage):
    d = _doctored(tmp_path)
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    (n,) = np.frombuffer(bytes(raw[:8]), "<u8")
    if damage == "truncated":
        raw = raw[:len(raw) - 1000]
    elif damage == "header_len":
        raw[:8] = (len(raw) * 2).to_bytes(8, "little")
    elif damage == "json":
        raw[8] = ord("x")           # no longer JSON
    else:
        h = raw[8:8 + int(n)].decode()
        h = h.replace('"data_offsets": [0, ', '"data_offsets": [1, ', 1)
        raw[8:8 + int(n)] = h.encode()
    f.write_bytes(bytes(raw))
    _fails(d, tmp_path, "model.safetensors")


def test_convert_error_overlapping_data_ranges(tmp_path):
    """Two tensors over the same bytes (the format forbids overlaps): one would silently get the other's data."""
    d = _doctored(tmp_path)
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    (n,) = np.frombuffer(bytes(raw[:8]), "<u8")
    h = json.loads(raw[8:8 + int(n)].decode())
    a, b = "model.layers.0.ffn.gate.tid2eid", "model.layers.1.ffn.gate.tid2eid"
    assert h[a]["shape"] == h[b]["shape"] and h[a]["dtype"] == h[b]["dtype"]
    h[b]["data_offsets"] = h[a]["data_offsets"]
    hb = json.dumps(h).encode()
    hb += b" " * (int(n) - len(hb))
    assert len(hb) == int(n)
    raw[8:8 + int(n)] = hb
    f.write_bytes(bytes(raw))
    _fails(d, tmp_path, "overlapping data ranges")


@pytest.mark.parametrize("key,value,needle", [
    ("index_head_dim", 96, "index_head_dim"),        # the engine needs a power of two (Hadamard + FP4 blocks)
    ("rms_norm_eps", 1e300, "rms_norm_eps"),          # F32 in the GGUF: it was written as inf
    ("swiglu_limit", -1e300, "swiglu_limit"),
    ("rope_parameters", "yarn", "rope_parameters"),   # not an object: YaRN was silently off
    ("max_position_embeddings", 1.5, "max_position_embeddings"),
    ("max_position_embeddings", 2.0 ** 60, "max_position_embeddings"),  # a real beyond a double's exact integers
    # finite values the engine refuses at load (model.h's ranges): the converter exited 0 and wrote a file that
    # could not be used
    ("hc_eps", 0, "hc_eps"), ("hc_eps", 2, "hc_eps"), ("rms_norm_eps", 0, "rms_norm_eps"),
    ("rms_norm_eps", 7, "rms_norm_eps"), ("routed_scaling_factor", 0, "routed_scaling_factor"),
    ("routed_scaling_factor", -1, "routed_scaling_factor"), ("routed_scaling_factor", 2 ** 31, "routed_scaling_factor"),
])
def test_convert_refuses_config_values_the_engine_would_misread(tmp_path, key, value, needle):
    def edit(c):
        c[key] = value
    _fails(_doctored(tmp_path, edit_cfg=edit), tmp_path, needle)


def test_convert_writes_large_integers_exactly(tmp_path):
    """max_position_embeddings = 2^53 + 1 went through a double and came out 2^53."""
    def edit(c):
        c["max_position_embeddings"] = 2 ** 53 + 1
    d = _doctored(tmp_path, edit_cfg=edit)
    out = tmp_path / "x.gguf"
    r = convert(d, out)
    assert r.returncode == 0, r.stderr
    _, kv, _ = _dump(out)
    assert kv["deepseek4.context_length"] == 2 ** 53 + 1


@pytest.mark.parametrize("name", ["model.layers.4294967296.attn_norm.weight", "model.layers.01.attn_norm.weight",
                                  "model.layers.+1.attn_norm.weight", "model.layers. 1.attn_norm.weight"])
def test_convert_refuses_tensor_names_with_odd_numbers(tmp_path, name):
    """Layer and expert numbers are plain decimals: an overflowing one mapped to another layer (4294967296 -> 0),
    '+1', ' 1' and '01' were aliases of layer 1."""
    def edit(st):
        st[name] = st["model.layers.1.attn_norm.weight"]
    _fails(_doctored(tmp_path, edit_st=edit), tmp_path, name.split(".", 1)[1] if "model." in name else name)


def _header_shifted(tmp_path, shift):
    """The model with its safetensors header padded by 16 spaces (a valid file), then the stated header length
    made `shift` bytes shorter: the JSON still parses (trailing spaces), every tensor would be read shift bytes
    early."""
    tmp_path.mkdir()
    d = _doctored(tmp_path)
    f = d / "model.safetensors"
    raw = f.read_bytes()
    (n,) = np.frombuffer(raw[:8], "<u8")
    hb = raw[8:8 + int(n)] + b" " * 16
    raw = np.array([len(hb) - shift], "<u8").tobytes() + hb + raw[8 + int(n):]
    f.write_bytes(raw)
    return d


def test_convert_error_header_length_off_by_a_few_bytes(tmp_path):
    """The tensors must tile the data area exactly (as the reference reader requires): a header length a few
    bytes short converted garbage with exit 0 (or failed much later with misleading value errors)."""
    d = _header_shifted(tmp_path / "ok", 0)
    r = convert(d, tmp_path / "ok.gguf", asan=True)
    assert r.returncode == 0, r.stderr  # the padded file itself is valid
    for shift in (2, 4, 8):
        _fails(_header_shifted(tmp_path / str(shift), shift), tmp_path / str(shift), "a wrong header length")


def test_convert_accepts_an_empty_tensor_at_the_start_of_the_data(tmp_path):
    """A zero-length tensor at offset 0 beside a tensor that also starts at 0 is valid safetensors (it was
    refused as an overlap, depending on the sort order)."""
    def add_empty(st):
        st["zz.empty_marker"] = ("F32", np.zeros((0,), dtype=np.float32))
    d = _doctored(tmp_path, edit_st=add_empty)
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    (n,) = np.frombuffer(bytes(raw[:8]), "<u8")
    h = json.loads(raw[8:8 + int(n)].decode())
    assert h["zz.empty_marker"]["data_offsets"][0] == h["zz.empty_marker"]["data_offsets"][1]
    h["zz.empty_marker"]["data_offsets"] = [0, 0]
    hb = json.dumps(h).encode()
    hb += b" " * (int(n) - len(hb))
    assert len(hb) == int(n)
    raw[8:8 + int(n)] = hb
    f.write_bytes(bytes(raw))
    r = convert(d, tmp_path / "x.gguf", asan=True)
    assert "overlapping" not in r.stderr, r.stderr
    assert "zz.empty_marker" in r.stderr  # refused as an unknown tensor name, not as an overlap


def test_convert_refuses_outputs_that_are_not_files_or_are_inputs(tmp_path):
    """-o must be a path a rename may replace (as root, -o /dev/null replaced the device with a file) in an
    existing directory, checked before converting; -o and --mtp-out differ; neither names an input."""
    d = _doctored(tmp_path)
    conv = prog("ds4-convert")
    cases = [(["-o", "/dev/null"], "character device"), (["-o", str(tmp_path)], "is a directory"),
             (["-o", str(tmp_path / "no" / "x.gguf")], "its directory"), (["-o", ""], "empty"),
             (["-o", str(d / "model.safetensors")], "is a file of the checkpoint"),
             (["-o", str(tmp_path / "x.gguf"), "--mtp-out", "/dev/null"], "--mtp-out /dev/null"),
             (["-o", str(tmp_path / "x.gguf"), "--mtp-out", str(tmp_path / "x.gguf")], "name the same file"),
             # the same new file under two spellings (the MTP file replaced the main one, exit 0)
             (["-o", str(tmp_path / "x.gguf"), "--mtp-out", str(tmp_path / "." / "x.gguf")], "name the same file"),
             (["-o", str(tmp_path / "x.gguf"), "--mtp-out", str(d / ".." / "x.gguf")], "name the same file")]
    before = (d / "model.safetensors").read_bytes()
    for args, needle in cases:
        r = subprocess.run([conv, "--hf", str(d), *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and needle in r.stderr, (args, r.returncode, r.stderr)
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
    assert (d / "model.safetensors").read_bytes() == before
    assert not list(tmp_path.glob("*.gguf*"))


def _dump(path):
    """Metadata and tensor table through ds4-gguf --json (gguf-py's reader takes ~20 s on a 129k-token vocab)."""
    r = subprocess.run([prog("ds4-gguf"), "--json", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    return d, {k["key"]: k["value"] for k in d["kv"]}, {t["name"]: t for t in d["tensors"]}


def test_convert_demo_model_with_tokenizer(tmp_path):
    out = tmp_path / "demo.gguf"
    r = subprocess.run([prog("ds4-convert"), "--demo", "-o", str(out), "--tokenizer",
                        str(ROOT / "tests/data/deepseek-v3-tokenizer.json"), "--seed", "7"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    d, kvs, ts = _dump(out)
    n_vocab = kvs["deepseek4.vocab_size"]
    assert n_vocab == 129280 == len(kvs["tokenizer.ggml.tokens"])
    assert ts["token_embd.weight"]["ne"] == [256, n_vocab] and ts["token_embd.weight"]["type"] == "F16"
    assert ts["output.weight"]["type"] == "Q8_0"
    ratios = kvs["deepseek4.attention.compress_ratios"]
    assert 0 in ratios and 4 in ratios and any(x not in (0, 4) for x in ratios)
    assert kvs["deepseek4.hash_layer_count"] > 0
    t = ts["blk.0.ffn_gate_tid2eid.weight"]
    raw = np.fromfile(out, dtype="<i4", count=t["n_elems"], offset=d["data_offset"] + t["offset"])
    assert raw.min() >= 0 and raw.max() < kvs["deepseek4.expert_count"]
    assert "meaningless" in subprocess.run([prog("ds4-convert"), "--help"], capture_output=True, text=True).stdout


def test_convert_vocab_only(tmp_path):
    out = tmp_path / "tok.gguf"
    r = subprocess.run([prog("ds4-convert"), "--vocab-only", "--tokenizer",
                        str(ROOT / "tests/data/deepseek-v3-tokenizer.json"), "-o", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    d, kvs, ts = _dump(out)
    assert not ts
    toks = kvs["tokenizer.ggml.tokens"]
    assert "<｜begin▁of▁sentence｜>" in toks and "<think>" in toks and len(toks) == 129280


def test_convert_tokenizer_vocab_mismatch_is_an_error(tmp_path):
    r = convert(ORACLE / "models" / "tiny_yarn", tmp_path / "x.gguf", extra=["--tokenizer",
                str(ROOT / "tests/data/deepseek-v3-tokenizer.json")])
    assert r.returncode == 1 and "vocab_size is 256" in r.stderr, r.stderr


@pytest.mark.parametrize("args,needle", [(["--seed", " +5"], "--seed"), (["--seed", "+5"], "--seed"),
                                         (["--threads", " 2"], "--threads"), (["--threads", "+2"], "--threads"),
                                         (["--name", ""], "--name must not be empty")])
def test_convert_numbers_are_digits_and_names_not_empty(tmp_path, args, needle):
    """strtol/strtoull skip blanks and take '+': ' +5' was a seed; an empty --name wrote an empty general.name.
    Digits only, as every other number option; refused with exit 2 and no output."""
    out = tmp_path / "d.gguf"
    r = subprocess.run([prog("ds4-convert"), "--demo", "-o", str(out), "--tokenizer",
                        str(ROOT / "tests/data/deepseek-v3-tokenizer.json")] + args, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert not out.exists()
