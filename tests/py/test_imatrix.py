"""ds4 --imatrix-out: the routed experts' importance matrix in llama.cpp's legacy .dat format (docs/FORMATS.md C.7).

Checked on the h256 oracle model (f32 GGUF, CPU): the file read back by a reader written from C.7's
description (entry order gate/up/down per layer, ncall 1, expert-major values, trailer with the batch count
and dataset path); its values equal a NumPy recomputation from the activations the engine dumped
(--imatrix-dump); the dumped down-projection inputs equal NumPy's clamped SwiGLU of the GGUF's expert weights
times the route weight; never-routed experts read 1.0; ds4-convert --imatrix accepts the file. Calibration text
split into blocks by "===== DS4_IMATRIX_PROMPT" lines (demo model, with tokenizer).
"""
import json
import struct
import subprocess

import gguf
import numpy as np
import pytest

from conftest import ROOT, prog
from oracle_util import ORACLE, convert


def read_dat(path):
    """Legacy imatrix reader (C.7): ([(name, ncall, values)], chunks, dataset)."""
    b = path.read_bytes()
    off = 0

    def take(fmt):
        nonlocal off
        v = struct.unpack_from(fmt, b, off)
        off += struct.calcsize(fmt)
        return v

    (n,) = take("<i")
    entries = []
    for _ in range(n):
        (ln,) = take("<i")
        name = b[off:off + ln].decode()
        off += ln
        ncall, nval = take("<ii")
        vals = np.frombuffer(b, dtype="<f4", count=nval, offset=off)
        off += 4 * nval
        entries.append((name, ncall, vals))
    chunks = dataset = None
    if off < len(b):
        (chunks,) = take("<i")
        (dl,) = take("<i")
        dataset = b[off:off + dl].decode()
        off += dl
    assert off == len(b)
    return entries, chunks, dataset


def read_dump(path, n_layer):
    """Records of --imatrix-dump: per layer a list of (x, ids, w, act)."""
    b = path.read_bytes()
    off, out = 0, {il: [] for il in range(n_layer)}
    while off < len(b):
        il, n, k, D, F = struct.unpack_from("<5i", b, off)
        off += 20
        x = np.frombuffer(b, "<f4", n * D, off).reshape(n, D); off += 4 * n * D
        ids = np.frombuffer(b, "<i4", n * k, off).reshape(n, k); off += 4 * n * k
        w = np.frombuffer(b, "<f4", n * k, off).reshape(n, k); off += 4 * n * k
        act = np.frombuffer(b, "<f4", n * k * F, off).reshape(n, k, F); off += 4 * n * k * F
        out[il].append((x, ids, w, act))
    return out


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    d = tmp_path_factory.mktemp("imatrix")
    model = d / "h256.gguf"
    r = convert(ORACLE / "models" / "h256", model, "f32")
    assert r.returncode == 0, r.stderr
    tokens = ORACLE / "h256_40" / "tokens.txt"
    dat, dump = d / "im.dat", d / "im.dump"
    r = subprocess.run([prog("ds4"), "-m", str(model), "--cpu", "--plain-numerics", "-c", "32",
                        "--prompt-tokens-file", str(tokens), "--imatrix-out", str(dat), "--imatrix-dump", str(dump)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((ORACLE / "models" / "h256" / "config.json").read_text())
    return model, dat, dump, tokens, cfg


def test_imatrix_file_layout_c7(collected):
    model, dat, dump, tokens, cfg = collected
    entries, chunks, dataset = read_dat(dat)
    L, E, D, F = cfg["num_hidden_layers"], cfg["n_routed_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"]
    want = [f"blk.{il}.{w}.weight" for il in range(L) for w in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")]
    assert [e[0] for e in entries] == want
    for name, ncall, vals in entries:
        assert ncall == 1
        assert len(vals) == E * (F if "down" in name else D)
        assert np.all(np.isfinite(vals)) and np.all(vals >= 0)
    for il in range(L):                                   # gate and up carry identical data
        assert np.array_equal(entries[3 * il][2], entries[3 * il + 1][2])
    assert dataset == str(tokens)
    assert chunks == 1              # 40 tokens cut to -c 32, one prefill batch (layer-0 observations counted)


def test_imatrix_values_equal_numpy_recomputation(collected):
    model, dat, dump, tokens, cfg = collected
    entries, _, _ = read_dat(dat)
    L, E, D, F, K = (cfg["num_hidden_layers"], cfg["n_routed_experts"], cfg["hidden_size"],
                     cfg["moe_intermediate_size"], cfg["num_experts_per_tok"])
    recs = read_dump(dump, L)
    r = gguf.GGUFReader(str(model))
    ts = {t.name: t for t in r.tensors}
    lim = np.float32(cfg["swiglu_limit"])
    routed_total = 0
    for il in range(L):
        x = np.concatenate([rec[0] for rec in recs[il]])
        ids = np.concatenate([rec[1] for rec in recs[il]])
        w = np.concatenate([rec[2] for rec in recs[il]])
        act = np.concatenate([rec[3] for rec in recs[il]])
        assert x.shape[0] == 32 and ids.shape == (32, K)
        # the dumped down-projection inputs: clamped SwiGLU of the expert weights, times the route weight
        W1 = np.array(ts[f"blk.{il}.ffn_gate_exps.weight"].data).reshape(E, F, D)
        W3 = np.array(ts[f"blk.{il}.ffn_up_exps.weight"].data).reshape(E, F, D)
        for t in range(x.shape[0]):
            for k in range(K):
                e = ids[t, k]
                g = (W1[e].astype(np.float64) @ x[t]).astype(np.float32)
                u = (W3[e].astype(np.float64) @ x[t]).astype(np.float32)
                g = np.minimum(g, lim)
                u = np.clip(u, -lim, lim)
                h = g / (1 + np.exp(-g)) * u * w[t, k]
                assert np.allclose(act[t, k], h, rtol=1e-4, atol=1e-6), (il, t, k)
        gate, down = entries[3 * il][2].reshape(E, D), entries[3 * il + 2][2].reshape(E, F)
        for e in range(E):
            sel = ids == e
            n = int(sel.sum())
            routed_total += n
            if n == 0:
                assert np.all(gate[e] == 1.0) and np.all(down[e] == 1.0)
                continue
            tok = np.nonzero(sel)[0]
            mx = (x[tok].astype(np.float64) ** 2).mean(axis=0)
            ma = (act[sel].astype(np.float64) ** 2).mean(axis=0)
            assert np.allclose(gate[e], mx, rtol=1e-6, atol=0), (il, e)
            assert np.allclose(down[e], ma, rtol=1e-6, atol=0), (il, e)
    assert routed_total == L * 32 * K


def test_imatrix_file_used_by_convert(collected, tmp_path):
    import official_ckpt as oc
    model, dat, dump, tokens, cfg = collected
    d = tmp_path / "ckpt"
    oc.make(ORACLE / "models" / "h256", d)
    out = tmp_path / "q4.gguf"
    r = convert(d, out, "q4", extra=["--imatrix", str(dat), "--imatrix-strict"])
    assert r.returncode == 0, r.stderr
    assert "importance for 6 of" in r.stderr
    rd = gguf.GGUFReader(str(out))
    assert rd.fields["quantize.imatrix.entries_count"].contents() == 6
    assert rd.fields["quantize.imatrix.chunks_count"].contents() == 1


def test_imatrix_prompt_file_blocks_demo_model(tmp_path):
    demo = ROOT / "build" / "demo.gguf"
    calib = tmp_path / "calib.txt"
    calib.write_text("===== DS4_IMATRIX_PROMPT 1\n  Hello there, how are you?\n"
                     "===== DS4_IMATRIX_PROMPT 2\n<｜User｜>Tell me a story.<｜Assistant｜>Once upon a time\n"
                     "===== DS4_IMATRIX_PROMPT 3\n   \n")
    dat = tmp_path / "demo.dat"
    r = subprocess.run([prog("ds4"), "-m", str(demo), "--cpu", "--prompt-file", str(calib), "--imatrix-out",
                        str(dat)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "block 2/2" in r.stderr                         # the empty third block is skipped
    entries, chunks, dataset = read_dat(dat)
    assert chunks == 2 and dataset == str(calib)
    assert len(entries) == 3 * 6                           # the demo model has 6 layers
    # refusals: no prompt; a CUDA-only observer is not reachable here, a bad output path is
    r = subprocess.run([prog("ds4"), "-m", str(demo), "--cpu", "--imatrix-out", str(dat)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--prompt-file" in r.stderr
    r = subprocess.run([prog("ds4"), "-m", str(demo), "--cpu", "--prompt-file", str(calib), "--imatrix-out",
                        str(tmp_path / "no" / "x.dat")], capture_output=True, text=True, timeout=300)
    # refused before the run (a usage error): the directory does not exist
    assert r.returncode == 2 and "its directory" in r.stderr, r.stderr


def test_imatrix_out_full_disk_leaves_the_old_file(collected, tmp_path):
    """A real ENOSPC (a 1 MiB tmpfs filled but for 8 KiB; the .dat is ~18 KiB): ds4 exits 1 with "disk full"
    naming the file, the .dat that was there before is untouched and no temporary file is left."""
    from oracle_util import in_small_tmpfs
    model, dat, dump, tokens, cfg = collected
    assert dat.stat().st_size > 16 << 10
    cmd = (f"printf old > $FS/im.dat; head -c {1016 << 10} /dev/zero > $FS/fill 2>/dev/null; "
           f"{prog('ds4')} -m {model} --cpu -c 32 --prompt-tokens-file {tokens} --imatrix-out $FS/im.dat; rc=$?; "
           f"echo \"OLD:$(cat $FS/im.dat)\"; rm $FS/fill; (exit $rc)")
    r = in_small_tmpfs(tmp_path, 1024, cmd)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "disk full writing" in r.stderr and "/fs/im.dat" in r.stderr and "No space left" in r.stderr, r.stderr
    assert "OLD:old\n" in r.stdout, r.stdout
    assert r.stdout.split("LISTING:")[1].split() == ["im.dat"], r.stdout


def test_imatrix_out_file_size_limit(collected, tmp_path):
    """A file-size limit (ulimit -f 8: 8 KiB) below the .dat's size: ds4 ignores SIGXFSZ while writing it, so the
    write fails with EFBIG; exit 1 with "file too large" naming the file, and the directory stays empty."""
    model, dat, dump, tokens, cfg = collected
    outdir = tmp_path / "out"
    outdir.mkdir()
    cmd = (f"ulimit -f 8; exec {prog('ds4')} -m {model} --cpu -c 32 --prompt-tokens-file {tokens} "
           f"--imatrix-out {outdir / 'im.dat'}")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "file too large writing" in r.stderr and str(outdir / "im.dat") in r.stderr, r.stderr
    assert list(outdir.iterdir()) == []
