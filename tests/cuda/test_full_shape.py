"""The full DeepSeek V4 Flash shape on the GPU against the CPU reference (make test-cuda with DS4_SYNTH_GGUF set to
a file written by ../shared/tools/synth_gguf.py; skipped, saying so, otherwise).

- After 1, 2 and 3 blocks (then the head) and after all 43, for a short prompt: the same numerics in a different
  order, so the logits must agree closely (printed per position; asserted at position 0, which no earlier
  position's rounding can reach, and at every position for the 1-block run).
- The chat prompts of ../shared/data/official-vectors/prompts (short ones): the same greedy tokens for the first
  steps on both backends.
"""
import os
import pathlib
import subprocess

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DS4 = str(ROOT / "ds4")
SYNTH = os.environ.get("DS4_SYNTH_GGUF")
PROMPTS = pathlib.Path(os.environ.get("DS4_PROMPTS_DIR", str(ROOT.parent / "shared/data/official-vectors/prompts")))
pytestmark = pytest.mark.skipif(not SYNTH or not pathlib.Path(SYNTH).exists(),
                                reason="DS4_SYNTH_GGUF not set: no full-shape model file (synth_gguf.py)")


def dump(backend, toks, out, layers, extra=()):
    cmd = [DS4, "-m", SYNTH, backend, "--prompt-tokens-file", str(toks), "--dump-logits", str(out), "--ctx", "64",
           *extra]
    if layers:
        cmd += ["--layers", str(layers)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return np.fromfile(out, dtype="<f4").reshape(len(toks.read_text().split()), -1), r.stdout


@pytest.mark.parametrize("layers", [1, 2, 3, 0])
def test_full_shape_layers_match_cpu(layers, tmp_path):
    toks = tmp_path / "t.txt"
    toks.write_text("0 128803 4959 20474 1113 128804 128822")
    g, _ = dump("--cuda", toks, tmp_path / "g.f32", layers)
    c, _ = dump("--cpu", toks, tmp_path / "c.f32", layers)
    scale = max(1.0, float(np.abs(c).max()))
    d = np.abs(g.astype(np.float64) - c).max(axis=1) / scale
    same = (g.argmax(1) == c.argmax(1)).mean()
    print(f"\nlayers {layers or 43}: rel diff per position {' '.join(f'{x:.1e}' for x in d)}; max |logit| {scale:.2f};"
          f" same argmax {same:.0%}")
    assert d[0] <= 1e-3
    if layers == 1:
        assert d.max() <= 1e-3


@pytest.mark.parametrize("name", ["short_italian_fact", "short_reasoning_plain", "short_code_completion"])
def test_full_shape_greedy_matches_cpu(name):
    p = PROMPTS / f"{name}.txt"
    if not p.exists():
        pytest.skip(f"{p} missing")
    outs = {}
    for be in ("--cpu", "--cuda"):
        r = subprocess.run([DS4, "-m", SYNTH, be, "--prompt-file", str(p), "-n", "4", "--temp", "0", "--ctx", "256",
                            "--nothink"], capture_output=True, timeout=900)
        assert r.returncode == 0, r.stderr.decode("utf-8", "replace")
        outs[be] = r.stdout
    print(f"\n{name}: cpu {outs['--cpu']!r}\n        gpu {outs['--cuda']!r}")
    assert outs["--cpu"] == outs["--cuda"]
