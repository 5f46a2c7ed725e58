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
