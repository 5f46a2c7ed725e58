"""`ds4 --dump-logits` end to end on a converted oracle model: the three evaluation modes give bit-identical
logits on the CPU (release and plain numerics), and bad token files fail cleanly with exit status 1."""
import subprocess

import numpy as np
import pytest

from conftest import prog
from oracle_util import ORACLE, convert


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    p = tmp_path_factory.mktemp("inv") / "tiny_yarn.gguf"
    r = convert(ORACLE / "models" / "tiny_yarn", p, "f32")
    assert r.returncode == 0, r.stderr
    return p


def dump(model, tokens_file, out, *extra):
    return subprocess.run([prog("ds4"), "-m", str(model), "--cpu", "--prompt-tokens-file", str(tokens_file),
                           "--dump-logits", str(out), *extra], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("plain", [False, True])
def test_dump_logits_eval_modes_bitwise_equal(model, tmp_path, plain):
    toks = tmp_path / "t.txt"
    toks.write_text(" ".join(str((i * 37 + 11) % 256) for i in range(41)))
    extra = ["--plain-numerics"] if plain else []
    outs = {}
    for mode in ("prefill", "decode", "chunk:3", "chunk:4", "chunk:9"):
        r = dump(model, toks, tmp_path / "o.f32", "--eval", mode, *extra)
        assert r.returncode == 0, r.stderr
        outs[mode] = (tmp_path / "o.f32").read_bytes()
    assert len(outs["prefill"]) == 41 * 256 * 4
    for mode, b in outs.items():
        assert b == outs["prefill"], f"{mode} differs from prefill"
    lg = np.frombuffer(outs["prefill"], dtype="<f4")
    assert np.isfinite(lg).all() and lg.std() > 0


@pytest.mark.parametrize("content,needle", [("1 2 x3", "not a token id"), ("", "no token ids"),
                                            ("1 2 256", "out of range"), ("-4", "not a token id")])
def test_dump_logits_bad_token_files(model, tmp_path, content, needle):
    f = tmp_path / "bad.txt"
    f.write_text(content)
    r = dump(model, f, tmp_path / "o.f32")
    assert r.returncode == 1 and needle in r.stderr, (r.returncode, r.stderr)


def test_dump_logits_missing_model_is_an_error(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("1 2 3")
    r = dump(tmp_path / "nope.gguf", f, tmp_path / "o.f32")
    assert r.returncode == 1 and "nope.gguf" in r.stderr


def _dequantized_copy(src, dst):
    """dst = src with every tensor dequantized to F32 by gguf-py (metadata copied)."""
    import gguf
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "deepseek4")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        t = f.types[0]
        if t == gguf.GGUFValueType.ARRAY:
            et = f.types[1]
            w.add_array(f.name, [bytes(f.parts[i]).decode() if et == gguf.GGUFValueType.STRING
                                 else f.parts[i].tolist()[0] for i in f.data])
        elif t == gguf.GGUFValueType.STRING:
            w.add_string(f.name, bytes(f.parts[f.data[0]]).decode())
        else:
            w.add_key_value(f.name, f.parts[f.data[0]].tolist()[0], t)
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if t.tensor_type == gguf.GGMLQuantizationType.I32:
            w.add_tensor(t.name, np.array(t.data).astype(np.int32).reshape(shape))
        else:
            w.add_tensor(t.name, np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_q8_0_model_equals_f32_model_on_gguf_py_dequantized_weights(tmp_path):
    """The Q8_0 weight path computes exactly the model whose weights are gguf-py's dequantization of the
    Q8_0 file (plain numerics: float32 activations), so q8_0-vs-f32 logit differences come from the weights
    alone (the f32 path itself is checked against transformers in test_oracle.py)."""
    q8 = tmp_path / "q8.gguf"
    r = convert(ORACLE / "models" / "tiny_yarn", q8, "q8_0")
    assert r.returncode == 0, r.stderr
    deq = tmp_path / "deq.gguf"
    _dequantized_copy(q8, deq)
    toks = ORACLE / "tiny_yarn_48" / "tokens.txt"
    assert dump(q8, toks, tmp_path / "a.f32", "--plain-numerics").returncode == 0
    assert dump(deq, toks, tmp_path / "b.f32", "--plain-numerics").returncode == 0
    a = np.fromfile(tmp_path / "a.f32", dtype="<f4")
    b = np.fromfile(tmp_path / "b.f32", dtype="<f4")
    d = np.abs(a - b).max()
    print(f"\nq8_0 engine vs f32 engine on dequantized weights: max |dlogit| {d:.2e}")
    assert d <= 2e-5
