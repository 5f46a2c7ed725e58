"""Test-side generator of tiny checkpoints in the official DeepSeek V4 Flash format (docs/FORMATS.md E):
official tensor names (no "model." prefix, embed.weight, head.weight, hc_head_fn, ...), FP8 E4M3FN dense
weights with one ue8m0 scale per 128x128 tile ("X.scale", F8_E8M0, ceil-sized), FP4 E2M1 routed experts
packed two codes per I8 byte (element 2j = low nibble) with one ue8m0 scale per 32 values of a row, an MTP
block (mtp.0.*), the official config.json keys, and shards named by a model.safetensors.index.json.

The dequantization here is written from the spec's formulas (E.3), independently of src/quant.c:
  e4m3 code c: sign bit 7, e = bits 3-6, m = bits 0-2: e == 0 -> m * 2^-9, else (1 + m/8) * 2^(e-7)
  e2m1 code:   sign bit 3, magnitude codes 0..7 -> 0, 0.5, 1, 1.5, 2, 3, 4, 6
  ue8m0 s:     2^(s - 127)
and make() returns, for every tensor, the float32 values the official kernels produce from the bytes written.
"""
import json
import pathlib
import struct

import numpy as np

from oracle_util import OFFICIAL_GLOBAL, st_read, strip_model

# the FP8 (".scale" 128x128) and FP4 (experts) tensors of the Flash checkpoint (E.3); the compressor and the
# head are FP8 here too, to exercise the ceil-sized partial tiles of small shapes
FP8_SUFFIXES = ("attn.wq_a.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.wo_a.weight", "attn.wo_b.weight",
                "ffn.shared_experts.w1.weight", "ffn.shared_experts.w2.weight", "ffn.shared_experts.w3.weight",
                "attn.compressor.wkv.weight", "attn.compressor.wgate.weight", "e_proj.weight", "h_proj.weight")
FP8_GLOBAL = ("head.weight",)


def e4m3_values():
    """float32 value of each of the 256 E4M3FN codes (NaN for 0x7f / 0xff)."""
    c = np.arange(256)
    s = np.where(c & 0x80, -1.0, 1.0)
    e, m = (c >> 3) & 15, c & 7
    v = np.where(e == 0, m * 2.0 ** -9, (1 + m / 8) * 2.0 ** (e - 7.0)) * s
    v[(c & 0x7F) == 0x7F] = np.nan
    return v.astype(np.float32)


E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)


def ue8m0(s):
    return np.ldexp(np.float32(1), s.astype(np.int32) - 127).astype(np.float32)


def fp8_dequant(codes, scales):
    """Official FP8 dequantization: e4m3(w[r][c]) * ue8m0(scale[r // 128][c // 128]), in float32."""
    s = ue8m0(scales)
    s = np.repeat(np.repeat(s, 128, axis=0), 128, axis=1)[:codes.shape[0], :codes.shape[1]]
    return (e4m3_values()[codes] * s).astype(np.float32)


def fp4_dequant(packed, scales):
    """Official FP4 dequantization: element 2j of a row = low nibble of byte j, times ue8m0(scale[r][i // 32])."""
    p = packed.view(np.uint8)
    codes = np.empty((p.shape[0], p.shape[1] * 2), dtype=np.uint8)
    codes[:, 0::2] = p & 15
    codes[:, 1::2] = p >> 4
    return (E2M1[codes] * np.repeat(ue8m0(scales), 32, axis=1)).astype(np.float32)


def _nearest(vals_sorted, x):
    i = np.clip(np.searchsorted(vals_sorted, x), 1, len(vals_sorted) - 1)
    lo, hi = vals_sorted[i - 1], vals_sorted[i]
    return np.where(np.abs(x - lo) <= np.abs(hi - x), i - 1, i)


def _exp_for(amax, top):
    """ue8m0 byte of the smallest power of two 2^k with amax / 2^k <= top."""
    with np.errstate(divide="ignore"):
        k = np.ceil(np.log2(np.where(amax > 0, amax / top, 1.0)))
    return np.clip(k + 127, 1, 254).astype(np.uint8)


def fp8_quantize(w, rng=None):
    """f32 [out, in] -> (E4M3 codes uint8, ue8m0 scales [ceil(out/128), ceil(in/128)]). rng: raw random codes
    (every non-NaN code, subnormals and -0 included) and random scales instead."""
    o, i = w.shape
    to, ti = -(-o // 128), -(-i // 128)
    if rng is not None:
        codes = rng.integers(0, 256, size=(o, i), dtype=np.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0x7E
        return codes, rng.integers(110, 135, size=(to, ti), dtype=np.uint8)
    pad = np.zeros((to * 128, ti * 128), dtype=np.float32)
    pad[:o, :i] = w
    amax = np.abs(pad.reshape(to, 128, ti, 128)).max(axis=(1, 3))
    sc = _exp_for(amax, 448.0)
    x = w / np.repeat(np.repeat(ue8m0(sc), 128, 0), 128, 1)[:o, :i]
    vals = e4m3_values()[:0x7F]                      # positive codes 0x00..0x7e, increasing
    codes = _nearest(vals, np.abs(x)).astype(np.uint8) | np.where(x < 0, 0x80, 0).astype(np.uint8)
    return codes, sc


def fp4_quantize(w, rng=None):
    """f32 [out, in] -> (packed int8 [out, in/2], ue8m0 scales [out, in/32])."""
    o, i = w.shape
    if rng is not None:
        packed = rng.integers(0, 256, size=(o, i // 2), dtype=np.uint8)
        return packed.view(np.int8), rng.integers(115, 131, size=(o, i // 32), dtype=np.uint8)
    amax = np.abs(w.reshape(o, i // 32, 32)).max(axis=2)
    sc = _exp_for(amax, 6.0)
    x = w / np.repeat(ue8m0(sc), 32, axis=1)
    codes = _nearest(E2M1[:8], np.abs(x)).astype(np.uint8) | np.where(x < 0, 8, 0).astype(np.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return packed.view(np.int8), sc


ST_NP = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I8": "i1", "U8": "u1",
         "F8_E4M3": "u1", "F8_E8M0": "u1"}


def st_write_raw(path, tensors):
    """tensors: {name: (dtype string, numpy array of the stored bytes' type)} -> safetensors file."""
    header, blobs, off = {}, [], 0
    for name, (dt, a) in tensors.items():
        b = np.ascontiguousarray(a, dtype=ST_NP[dt]).tobytes()
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def official_config(cfg):
    """transformers' DeepseekV4Config dict -> the official checkpoint's config.json (E.5)."""
    c = dict(cfg)
    rates = {"sliding_attention": 0, **c.pop("compress_rates")}
    c["compress_ratios"] = [rates[t] for t in c.pop("layer_types")] + [0] * c.get("num_nextn_predict_layers", 0)
    c["num_hash_layers"] = c.pop("mlp_layer_types").count("hash_moe")
    rp = c.pop("rope_parameters")
    c.pop("partial_rotary_factor", None)
    main, comp = (rp["main"], rp["compress"]) if "main" in rp else (rp, rp)
    c["rope_theta"] = main["rope_theta"]
    c["compress_rope_theta"] = comp["rope_theta"]
    if comp.get("rope_type") == "yarn":
        c["rope_scaling"] = {"type": "yarn", "factor": comp["factor"], "beta_fast": comp.get("beta_fast", 32.0),
                             "beta_slow": comp.get("beta_slow", 1.0),
                             "original_max_position_embeddings": comp["original_max_position_embeddings"]}
    c.update(model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"], expert_dtype="fp4",
             quantization_config={"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                  "weight_block_size": [128, 128], "activation_scheme": "dynamic"})
    return c


def _mtp_tensors(st, cfg, rng):
    """A random MTP block (mtp.0.*) shaped like a sliding, top-k-routed main layer (D.3), as float32."""
    D, E, hc = cfg["hidden_size"], cfg["n_routed_experts"], cfg["hc_mult"]
    il = 0
    out = {}
    for name, (dt, a) in st.items():
        n = strip_model(name)
        pre = f"layers.{il}."
        if not n.startswith(pre):
            continue
        suf = n[len(pre):]
        if suf.startswith(("attn.compressor.", "attn.indexer.")) or suf in ("ffn.gate.tid2eid", "ffn.gate.bias"):
            continue
        out["mtp.0." + suf] = (rng.standard_normal(a.shape) * 0.05).astype(np.float32)
    out["mtp.0.ffn.gate.bias"] = (rng.standard_normal(E) * 0.1).astype(np.float32)
    for k in ("e_proj.weight", "h_proj.weight"):
        out["mtp.0." + k] = (rng.standard_normal((D, D)) * 0.05).astype(np.float32)
    for k in ("enorm.weight", "hnorm.weight", "norm.weight"):
        out["mtp.0." + k] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    out["mtp.0.hc_head_fn"] = (rng.standard_normal((hc, hc * D)) * 0.05).astype(np.float32)
    out["mtp.0.hc_head_base"] = (rng.standard_normal(hc) * 0.1).astype(np.float32)
    out["mtp.0.hc_head_scale"] = np.array([0.5], dtype=np.float32)
    return out


def make(src_dir, dst_dir, n_shards=3, raw_seed=None, mtp=True, bf16_vectors=True):
    """Writes the official-format checkpoint of the oracle model in src_dir to dst_dir. raw_seed: FP8/FP4
    bytes and scales drawn at random (every code) instead of quantizing the model's weights. Returns
    {official name: float32 values of the official dequantization} (int64 for tid2eid)."""
    src_dir, dst_dir = pathlib.Path(src_dir), pathlib.Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src_dir / "config.json").read_text())
    st = st_read(src_dir / "model.safetensors")
    rng = np.random.default_rng(raw_seed if raw_seed is not None else 7)
    raw = np.random.default_rng(raw_seed) if raw_seed is not None else None
    weights = {}
    for name, (dt, a) in st.items():
        n = strip_model(name)
        weights[OFFICIAL_GLOBAL.get(n, n)] = a
    if mtp:
        weights.update(_mtp_tensors(st, cfg, rng))
    stored, deq = {}, {}
    for n, a in sorted(weights.items()):
        if a.dtype == np.int64:                          # tid2eid
            stored[n], deq[n] = ("I64", a), a
            continue
        a = a.astype(np.float32)
        is_expert = ".ffn.experts." in n
        is_fp8 = n in FP8_GLOBAL or n.endswith(FP8_SUFFIXES) and a.ndim == 2
        if is_expert:
            packed, sc = fp4_quantize(a, raw)
            stored[n], stored[n[:-len(".weight")] + ".scale"] = ("I8", packed), ("F8_E8M0", sc)
            deq[n] = fp4_dequant(packed, sc)
        elif is_fp8:
            codes, sc = fp8_quantize(a, raw)
            stored[n], stored[n[:-len(".weight")] + ".scale"] = ("F8_E4M3", codes), ("F8_E8M0", sc)
            deq[n] = fp8_dequant(codes, sc)
        elif a.ndim == 1 and bf16_vectors and "hc_" not in n:     # BF16 vectors, HC parameters F32 (E.3)
            b = (a.view(np.uint32) >> 16).astype(np.uint16)
            stored[n] = ("BF16", b)
            deq[n] = (b.astype(np.uint32) << 16).view(np.float32)
        else:
            stored[n], deq[n] = ("F32", a), a
    names = list(stored)
    # shards by position in the sorted list, so a weight and its .scale may sit in different shards
    wm = {}
    for k in range(n_shards):
        fn = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        part = names[k * len(names) // n_shards:(k + 1) * len(names) // n_shards]
        st_write_raw(dst_dir / fn, {x: stored[x] for x in part})
        wm.update({x: fn for x in part})
    (dst_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}, indent=1))
    (dst_dir / "config.json").write_text(json.dumps(official_config(cfg), indent=1))
    return deq


def write_f32_reference(deq, cfg_src_dir, dst_dir, mtp=False):
    """The dequantized weights as a plain F32 checkpoint (same names, the official config), for comparison."""
    dst_dir = pathlib.Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((pathlib.Path(cfg_src_dir) / "config.json").read_text())
    t = {n: ("I64" if a.dtype == np.int64 else "F32", a) for n, a in deq.items() if mtp or not n.startswith("mtp.")}
    st_write_raw(dst_dir / "model.safetensors", t)
    (dst_dir / "config.json").write_text(json.dumps(official_config(cfg), indent=1))


def layer_shapes(il, cfg, ratio, hash_layer, mtp=False):
    """Official per-layer tensor names (without the "layers.N." / "mtp.N." prefix) and PyTorch shapes, written
    from docs/FORMATS.md D.2 / D.3 (HF shape = reversed ne)."""
    D, H, dh = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"]
    ql, ol, G = cfg["q_lora_rank"], cfg["o_lora_rank"], cfg["o_groups"]
    E, F, K, hc = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["num_experts_per_tok"], cfg["hc_mult"]
    mix = (2 + hc) * hc
    s = {"hc_attn_fn": (mix, hc * D), "hc_attn_scale": (3,), "hc_attn_base": (mix,), "attn_norm.weight": (D,),
         "attn.wq_a.weight": (ql, D), "attn.q_norm.weight": (ql,), "attn.wq_b.weight": (H * dh, ql),
         "attn.wkv.weight": (dh, D), "attn.kv_norm.weight": (dh,), "attn.attn_sink": (H,),
         "attn.wo_a.weight": (G * ol, H * dh // G), "attn.wo_b.weight": (D, G * ol),
         "hc_ffn_fn": (mix, hc * D), "hc_ffn_scale": (3,), "hc_ffn_base": (mix,), "ffn_norm.weight": (D,),
         "ffn.gate.weight": (E, D), "ffn.shared_experts.w1.weight": (F, D), "ffn.shared_experts.w3.weight": (F, D),
         "ffn.shared_experts.w2.weight": (D, F)}
    if ratio:
        w = (2 if ratio == 4 else 1) * dh
        s.update({"attn.compressor.ape": (ratio, w), "attn.compressor.wkv.weight": (w, D),
                  "attn.compressor.wgate.weight": (w, D), "attn.compressor.norm.weight": (dh,)})
    if ratio == 4:
        ih, idim = cfg["index_n_heads"], cfg["index_head_dim"]
        s.update({"attn.indexer.wq_b.weight": (ih * idim, ql), "attn.indexer.weights_proj.weight": (ih, D),
                  "attn.indexer.compressor.ape": (4, 2 * idim), "attn.indexer.compressor.wkv.weight": (2 * idim, D),
                  "attn.indexer.compressor.wgate.weight": (2 * idim, D),
                  "attn.indexer.compressor.norm.weight": (idim,)})
    if hash_layer:
        s["ffn.gate.tid2eid"] = (cfg["vocab_size"], K)
    else:
        s["ffn.gate.bias"] = (E,)
    for e in range(E):
        s.update({f"ffn.experts.{e}.w1.weight": (F, D), f"ffn.experts.{e}.w3.weight": (F, D),
                  f"ffn.experts.{e}.w2.weight": (D, F)})
    return s


def make_random(dst_dir, cfg, n_shards=4, seed=1, gaussian=False):
    """A random checkpoint in the official format with the shapes of cfg (an official config.json dict):
    FP8 codes for the FP8 tensors, FP4 experts, BF16 embedding and vectors, F32 HC parameters; written shard
    by shard (memory: one shard). For throughput and memory measurements with full-size tensors. gaussian:
    matrices drawn N(0, 0.02^2) and quantized to FP8/FP4 as the official checkpoint's are (realistic
    per-block scales, for quantization-error figures) instead of uniformly random codes and scales."""
    dst_dir = pathlib.Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    D, V, hc = cfg["hidden_size"], cfg["vocab_size"], cfg["hc_mult"]
    shapes = {"embed.weight": (V, D), "head.weight": (V, D), "norm.weight": (D,), "hc_head_fn": (hc, hc * D),
              "hc_head_base": (hc,), "hc_head_scale": (1,)}
    for il in range(cfg["num_hidden_layers"]):
        for k, v in layer_shapes(il, cfg, cfg["compress_ratios"][il], il < cfg["num_hash_layers"]).items():
            shapes[f"layers.{il}.{k}"] = v
    names = sorted(shapes)
    wm = {}
    for k in range(n_shards):
        fn = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {}
        for n in names[k * len(names) // n_shards:(k + 1) * len(names) // n_shards]:
            sh = shapes[n]
            src = (rng.standard_normal(sh, dtype=np.float32) * 0.02) if gaussian and len(sh) == 2 else None
            qrng = None if gaussian else rng
            if ".ffn.experts." in n:
                packed, sc = fp4_quantize(src if gaussian else np.zeros(sh, np.float32), qrng)
                part[n], part[n[:-7] + ".scale"] = ("I8", packed), ("F8_E8M0", sc)
            elif n == "head.weight" or (n.endswith(FP8_SUFFIXES) and len(sh) == 2):
                if gaussian:                 # in slabs of 8192 rows: the head is 0.5 G values
                    parts = [fp8_quantize(src[r:r + 8192]) for r in range(0, sh[0], 8192)]
                    codes, sc = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
                else:
                    codes, sc = fp8_quantize(np.zeros(sh, np.float32), qrng)
                part[n], part[n[:-7] + ".scale"] = ("F8_E4M3", codes), ("F8_E8M0", sc)
            elif n.endswith("tid2eid"):
                part[n] = ("I64", rng.integers(0, cfg["n_routed_experts"], size=sh))
            elif "hc_" in n:
                part[n] = ("F32", (rng.standard_normal(sh) * 0.05).astype(np.float32))
            elif gaussian and src is not None:
                part[n] = ("BF16", (src.view(np.uint32) >> 16).astype(np.uint16))
            else:
                part[n] = ("BF16", (rng.integers(0x3c00, 0x3c80, size=sh, dtype=np.uint16) |
                                    rng.integers(0, 2, size=sh, dtype=np.uint16) << 15).astype(np.uint16))
        st_write_raw(dst_dir / fn, part)
        wm.update({x: fn for x in part})
    (dst_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (dst_dir / "config.json").write_text(json.dumps(cfg, indent=1))


FLASH_CONFIG = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 129280,
    "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64, "num_key_value_heads": 1,
    "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_lora_rank": 1024, "o_groups": 8,
    "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 6,
    "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc", "norm_topk_prob": True, "routed_scaling_factor": 1.5,
    "num_hash_layers": 3, "swiglu_limit": 10.0, "sliding_window": 128,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "compress_rope_theta": 160000, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                     "beta_slow": 1},
    "max_position_embeddings": 1048576, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
    "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "num_nextn_predict_layers": 1,
    "expert_dtype": "fp4", "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                            "weight_block_size": [128, 128], "activation_scheme": "dynamic"},
}


if __name__ == "__main__":
    # python tests/py/official_ckpt.py DIR [N_EXPERTS] [RATIO] [gaussian]: one full-size Flash layer (the real
    # shapes; fewer routed experts to save disk) in the official format, for throughput / memory / error figures.
    import sys
    cfg = dict(FLASH_CONFIG)
    cfg.update(num_hidden_layers=1, num_hash_layers=0, num_nextn_predict_layers=0,
               n_routed_experts=int(sys.argv[2]) if len(sys.argv) > 2 else 256,
               compress_ratios=[int(sys.argv[3]) if len(sys.argv) > 3 else 4])
    make_random(sys.argv[1], cfg, gaussian=len(sys.argv) > 4 and sys.argv[4] == "gaussian")
