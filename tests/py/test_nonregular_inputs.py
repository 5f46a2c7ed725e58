"""FIFOs and other non-regular files where a program expects a file (issue
14): each program refuses them at once with a one-line reason instead of
blocking in open(2) forever, while --prompt-file keeps reading pipes.

Every run has a timeout: a regression shows up as a hang caught here, not
as a stuck suite.
"""
import json
import os
import shutil
import signal
import subprocess
import threading
import time

from conftest import ROOT, prog
from oracle_util import ASAN_ENV, ORACLE
from test_server import Server, demo_model

HEX = "0123456789abcdef" * 2 + "01234567"  # 40 hex digits: a cache entry name


def fifo(path):
    os.mkfifo(path)
    return str(path)


def test_ds4_gguf_and_ds4_refuse_a_fifo_model(tmp_path):
    f = fifo(tmp_path / "model.gguf")
    r = subprocess.run([prog("ds4-gguf"), f], capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and "not a regular file (a FIFO)" in r.stderr, r.stderr
    r = subprocess.run([prog("ds4"), "-m", f, "--cpu", "-p", "hi", "-n", "1"], capture_output=True,
                       text=True, timeout=20)
    assert r.returncode == 1 and "not a regular file (a FIFO)" in r.stderr, r.stderr
    r = subprocess.run([prog("ds4-server"), "-m", f, "--cpu", "--port", "0"], capture_output=True,
                       text=True, timeout=20)
    assert r.returncode == 1 and "not a regular file (a FIFO)" in r.stderr, r.stderr
    r = subprocess.run([prog("ds4-gguf"), str(tmp_path)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and "not a regular file (a directory)" in r.stderr, r.stderr


def test_ds4_prompt_file_from_a_pipe_still_works(tmp_path):
    """--prompt-file reads pipes: /dev/stdin fed by a pipe, and a named FIFO
    with a writer, give the same greedy output as a regular file."""
    model = demo_model()
    args = [prog("ds4"), "-m", model, "--cpu", "--ctx", "256", "-n", "4", "--temp", "0"]
    reg = tmp_path / "p.txt"
    reg.write_text("Hello there")
    want = subprocess.run(args + ["--prompt-file", str(reg)], capture_output=True, timeout=120)
    assert want.returncode == 0, want.stderr
    got = subprocess.run(args + ["--prompt-file", "/dev/stdin"], input=b"Hello there",
                         capture_output=True, timeout=120)
    assert got.returncode == 0 and got.stdout == want.stdout, got.stderr
    f = fifo(tmp_path / "p.fifo")

    def writer():
        with open(f, "w") as w:
            w.write("Hello there")
    t = threading.Thread(target=writer)
    t.start()
    got = subprocess.run(args + ["--prompt-file", f], capture_output=True, timeout=120)
    t.join(10)
    assert got.returncode == 0 and got.stdout == want.stdout, got.stderr


def _hf_copy(tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(ORACLE / "models" / "tiny_plain", d)
    return d


def _convert_asan(d, tmp_path, *extra):
    env = dict(os.environ, **ASAN_ENV)
    return subprocess.run([str(ROOT / "build" / "asan" / "ds4-convert"), "--hf", str(d), "-o",
                           str(tmp_path / "out.gguf"), *extra], capture_output=True, text=True,
                          timeout=60, env=env)


def test_convert_refuses_fifo_inputs(tmp_path):
    """config.json, model.safetensors, the index and --tokenizer as FIFOs."""
    for victim in ("config.json", "model.safetensors"):
        d = _hf_copy(tmp_path)
        (d / victim).unlink()
        fifo(d / victim)
        r = _convert_asan(d, tmp_path)
        assert r.returncode == 1 and "%s: not a regular file (a FIFO)" % victim in r.stderr, r.stderr
        shutil.rmtree(d)
    d = _hf_copy(tmp_path)
    fifo(d / "model.safetensors.index.json")
    r = _convert_asan(d, tmp_path)
    assert r.returncode == 1 and "index.json: not a regular file (a FIFO)" in r.stderr, r.stderr
    (d / "model.safetensors.index.json").unlink()
    names = json.loads((d / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (d / "model.safetensors").read_bytes()[:8], "little")])
    wm = {n: "shard.safetensors" for n in names if n != "__metadata__"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    fifo(d / "shard.safetensors")
    r = _convert_asan(d, tmp_path)
    assert r.returncode == 1 and "shard.safetensors: not a regular file (a FIFO)" in r.stderr, r.stderr
    shutil.rmtree(d)
    d = _hf_copy(tmp_path)
    tok = fifo(tmp_path / "tokenizer.json")
    r = _convert_asan(d, tmp_path, "--tokenizer", tok)
    assert r.returncode == 1 and "tokenizer.json: not a regular file (a FIFO)" in r.stderr, r.stderr


def test_server_starts_and_stops_with_a_fifo_in_the_kv_dir(tmp_path):
    """A FIFO and a directory named like cache entries: start-up does not
    block on them, the log says they were left in place (never "removed"),
    and SIGTERM stops the server."""
    kv = tmp_path / "kv"
    kv.mkdir()
    fifo(kv / (HEX + ".kv"))
    (kv / ("f" + HEX[1:] + ".kv")).mkdir()
    t0 = time.time()
    s = Server("--kv-disk-dir", kv, wait=60)
    try:
        assert time.time() - t0 < 60
        log = s.log_text()
        assert log.count("ignored, left in place") == 2, log
        assert "not a regular file (a FIFO)" in log and "not a regular file (a directory)" in log
        assert "removed" not in log
        st, _, _ = s.raw("GET", "/v1/models")
        assert st == 200
    finally:
        rc = s.stop(timeout=30)
    assert rc == 0
    assert (kv / (HEX + ".kv")).exists() and (kv / ("f" + HEX[1:] + ".kv")).is_dir()
