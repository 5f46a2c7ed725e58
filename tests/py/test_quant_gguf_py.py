"""Cross-checks of the quant formats (src/quant.c) against gguf-py.

Our code is called through ctypes on build/libds4.so. gguf-py's
`gguf.quants.dequantize` is an independent NumPy implementation of every
block format, and `gguf.quants.quantize` reproduces ggml's Q8_0 quantizer
bit for bit (docs/FORMATS.md §F). Comparisons are on bit patterns, not values.
"""
import ctypes

import numpy as np
import pytest

from conftest import ROOT

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import quants as gq  # noqa: E402

LIB = ROOT / "build" / "libds4.so"

F32, F16, Q8_0, Q2_K, Q4_K, IQ2_XXS, BF16 = 0, 1, 8, 10, 12, 16, 30
BLOCK_TYPES = {Q8_0: QT.Q8_0, Q4_K: QT.Q4_K, Q2_K: QT.Q2_K, IQ2_XXS: QT.IQ2_XXS}
ALL_TYPES = {**BLOCK_TYPES, F16: QT.F16, BF16: QT.BF16}


@pytest.fixture(scope="module")
def lib():
    if not LIB.exists():
        pytest.fail("%s is not built (run make)" % LIB)
    L = ctypes.CDLL(str(LIB))
    fp = ctypes.POINTER(ctypes.c_float)
    L.ds4_quantize_row.restype = ctypes.c_size_t
    L.ds4_quantize_row.argtypes = [ctypes.c_int, fp, ctypes.c_void_p, ctypes.c_int64, fp]
    L.ds4_quantize_rows.restype = ctypes.c_int
    L.ds4_quantize_rows.argtypes = [ctypes.c_int, fp, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                    fp, ctypes.c_void_p]
    L.ds4_dequant_row.restype = None
    L.ds4_dequant_row.argtypes = [ctypes.c_int, ctypes.c_void_p, fp, ctypes.c_int64]
    L.ds4_type_row_bytes.restype = ctypes.c_size_t
    L.ds4_type_row_bytes.argtypes = [ctypes.c_int, ctypes.c_int64]
    return L


def fptr(a):
    return None if a is None else a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


def quantize(L, t, x, imatrix=None):
    """Our quantizer on a (rows, cols) float32 matrix -> (rows, row_bytes) uint8."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    rb = L.ds4_type_row_bytes(t, cols)
    out = np.zeros((rows, rb), dtype=np.uint8)
    imp = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    rc = L.ds4_quantize_rows(t, fptr(x), out.ctypes.data, rows, cols, fptr(imp), None)
    assert rc == 0
    return out


def dequantize(L, t, q, cols):
    """Our dequantizer, row by row -> (rows, cols) float32."""
    q = np.ascontiguousarray(q)
    out = np.zeros((q.shape[0], cols), dtype=np.float32)
    for r in range(q.shape[0]):
        L.ds4_dequant_row(t, q[r].ctypes.data, fptr(out[r]), cols)
    return out


def gaussian(rng, rows, cols):
    return rng.standard_normal((rows, cols)).astype(np.float32)


def heavy_tailed(rng, rows, cols):
    """Student-t (3 dof) with 0.5% outliers 10-50x larger, plus Laplace rows."""
    x = rng.standard_t(3, size=(rows, cols))
    mask = rng.random((rows, cols)) < 0.005
    x[mask] *= rng.uniform(10, 50, size=mask.sum())
    x[::2] = rng.laplace(size=(rows - rows // 2, cols))
    return x.astype(np.float32)


def importance(rng, cols):
    u = rng.random(cols)
    return (np.exp(6 * u * u) - 0.9).astype(np.float32)  # positive, heavy spread


def bits_equal(a, b):
    return np.array_equal(np.asarray(a, np.float32).view(np.uint32), np.asarray(b, np.float32).view(np.uint32))


@pytest.mark.parametrize("t", sorted(ALL_TYPES))
@pytest.mark.parametrize("dist", ["gaussian", "heavy"])
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_gguf_py_dequantizes_our_quantizer_output_bit_exact(lib, t, dist, with_imatrix):
    rng = np.random.default_rng(1000 + t + (dist == "heavy") * 7 + with_imatrix)
    rows, cols = 8, 4096
    x = (gaussian if dist == "gaussian" else heavy_tailed)(rng, rows, cols)
    imp = importance(rng, cols) if with_imatrix else None
    q = quantize(lib, t, x, imp)
    ours = dequantize(lib, t, q, cols)
    theirs = gq.dequantize(q, ALL_TYPES[t])
    assert theirs.shape == (rows, cols)
    assert bits_equal(ours, theirs)
    # and the result is a real approximation of x (not e.g. all zeros); 2-bit
    # formats lose much of the outliers' energy on heavy-tailed rows
    rel = np.sqrt(np.mean((ours - x) ** 2) / np.mean(x ** 2))
    assert rel < (0.5 if dist == "gaussian" else 0.95)


def random_blocks(rng, t, n_blocks):
    """Random bytes with finite, sane f16 scale fields (docs/FORMATS.md F.2)."""
    elems, size = gguf.GGML_QUANT_SIZES[BLOCK_TYPES[t]]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)

    def scales(k):
        e = rng.integers(5, 21, size=k)
        m = rng.integers(0, 1024, size=k)
        s = rng.integers(0, 2, size=k)
        return ((s << 15) | (e << 10) | m).astype(np.uint16).view(np.uint8).reshape(k, 2)

    if t in (Q8_0, IQ2_XXS):
        raw[:, 0:2] = scales(n_blocks)
    elif t == Q4_K:
        raw[:, 0:2] = scales(n_blocks)
        raw[:, 2:4] = scales(n_blocks)
    elif t == Q2_K:
        raw[:, 80:82] = scales(n_blocks)
        raw[:, 82:84] = scales(n_blocks)
    return raw, elems


@pytest.mark.parametrize("t", sorted(BLOCK_TYPES))
def test_gguf_py_dequantizes_random_blocks_bit_exact(lib, t):
    rng = np.random.default_rng(2000 + t)
    raw, elems = random_blocks(rng, t, 512)
    # one row of 64 blocks per line: every code, scale and sign pattern
    rows = raw.reshape(8, -1)
    ours = dequantize(lib, t, rows, rows.shape[1] // gguf.GGML_QUANT_SIZES[BLOCK_TYPES[t]][1] * elems)
    theirs = gq.dequantize(rows, BLOCK_TYPES[t])
    assert bits_equal(ours, theirs)


def test_gguf_py_q8_0_quantize_bit_exact(lib):
    rng = np.random.default_rng(3)
    rows = [
        rng.standard_normal(4096),
        heavy_tailed(rng, 2, 4096)[0],
        np.zeros(4096),
        np.full(4096, -3.25),
        rng.standard_normal(4096) * 1e-6,
        rng.standard_normal(4096) * 1e4,
    ]
    # values landing exactly on .5 after scaling: amax 127 -> d = 1
    ties = np.tile(np.array([127.0] + [k + 0.5 for k in range(-15, 16)], dtype=np.float32), 128)
    rows.append(ties)
    rows.append(-ties)
    x = np.stack(rows).astype(np.float32)
    ours = quantize(lib, Q8_0, x)
    theirs = gq.quantize(x, QT.Q8_0)
    assert np.array_equal(ours, theirs)


def test_gguf_py_f16_bf16_conversion_matches_numpy(lib):
    rng = np.random.default_rng(4)
    bits = rng.integers(0, 2**32, size=200000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    extra = np.array([0.0, -0.0, 65504, 65519.99, 65520, -65520, 2**-24, 2**-25, 3 * 2**-26, 1e-8,
                      1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.4e38, -3.4e38, np.inf, -np.inf], dtype=np.float32)
    x = np.concatenate([x, extra, rng.standard_normal(10000).astype(np.float32)])
    x = x[: len(x) // 256 * 256].reshape(1, -1)
    # F16: numpy's float16 cast (round to nearest even) and gguf-py
    ours16 = quantize(lib, F16, x).view(np.uint16)
    with np.errstate(over="ignore"):
        assert np.array_equal(ours16, x.astype(np.float16).view(np.uint16))
        assert np.array_equal(ours16, gq.quantize(x, QT.F16).view(np.uint16))
    # BF16: gguf-py's rounding (same as ggml)
    oursbf = quantize(lib, BF16, x)
    assert np.array_equal(oursbf, gq.quantize(x, QT.BF16).view(np.uint8).reshape(oursbf.shape))
    # decoding both back
    assert bits_equal(dequantize(lib, F16, ours16.view(np.uint8), x.shape[1]), gq.dequantize(ours16.view(np.uint8), QT.F16))
    assert bits_equal(dequantize(lib, BF16, oursbf, x.shape[1]), gq.dequantize(oursbf, QT.BF16))


def test_quant_quality_rmse_with_and_without_imatrix_gguf_py(lib, capsys):
    """RMSE of Q4_K, Q2_K, IQ2_XXS (dequantized by gguf-py) with and without
    importance; the importance-weighted error must drop when the importance is
    given. Without an imatrix IQ2_XXS uses the synthetic importance of C.6."""
    rows, cols = 32, 4096
    lines = ["type     dist      rmse(plain)  rmse(imatrix)  wrmse(plain)  wrmse(imatrix)"]
    for dist in ("gaussian", "heavy"):
        rng = np.random.default_rng(50 + (dist == "heavy"))
        x = (gaussian if dist == "gaussian" else heavy_tailed)(rng, rows, cols)
        imp = importance(rng, cols)
        for t, name in ((Q4_K, "q4_K"), (Q2_K, "q2_K"), (IQ2_XXS, "iq2_xxs")):
            res = []
            for im in (None, imp):
                y = gq.dequantize(quantize(lib, t, x, im), BLOCK_TYPES[t])
                err2 = (y.astype(np.float64) - x) ** 2
                rmse = np.sqrt(err2.mean() / np.mean(x.astype(np.float64) ** 2))
                wrmse = np.sqrt((err2 * imp).sum() / ((x.astype(np.float64) ** 2) * imp).sum())
                res.append((rmse, wrmse))
            lines.append("%-8s %-9s %11.4f  %13.4f  %12.4f  %14.4f" % (name, dist, res[0][0], res[1][0], res[0][1], res[1][1]))
            assert res[1][1] < res[0][1], "%s %s: weighted error did not drop with the imatrix" % (name, dist)
    with capsys.disabled():
        print("\nrelative RMSE (quantize with ds4, dequantize with gguf-py):\n" + "\n".join(lines))
