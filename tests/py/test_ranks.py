"""Ranks (docs/ARCHITECTURE.md 6b): part r of a layer split in the worker process of rank r (`ds4 --worker
HOST:PORT --rank R`), rank 0 (`--ranks N --rendezvous HOST:PORT`) driving the layer loop and forwarding every
backend op of a remote part over the channel. Strict backends on both sides check that every pointer a stage
receives is the worker's own memory (the proxy rewrites the host-struct pointers, passes the worker's buffers
through). Results must equal one process bit for bit; a rank that goes away must fail the others cleanly."""
import json
import os
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from conftest import ROOT, prog
from oracle_util import ORACLE, convert, gguf_cache


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    return gguf_cache(tmp_path_factory.mktemp("ranks"))


def workers(n, port, backend="--strict-backend", extra=()):
    return [subprocess.Popen([prog("ds4"), "--worker", f"127.0.0.1:{port}", "--rank", str(r), backend,
                              "--rank-timeout", "60", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for r in range(1, n)]


def finish(ws, timeout=60):
    out = []
    for w in ws:
        try:
            _, err = w.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            w.kill()
            _, err = w.communicate()
            pytest.fail(f"worker did not exit after rank 0: {err}")
        out.append((w.returncode, err))
    return out


def dump(model, fx, out, release, mode, extra=(), backend="--strict-backend"):
    cmd = [prog("ds4"), "-m", str(model), backend, "--prompt-tokens-file", str(ORACLE / fx / "tokens.txt"),
           "--dump-logits", str(out), "--eval", mode, *extra]
    if not release:
        cmd.append("--plain-numerics")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"
    return np.fromfile(out, dtype="<u4")


@pytest.mark.parametrize("fx,ranks,split", [("tiny_yarn_48_release", 2, "2,3"), ("tiny_yarn_48", 3, "1,2,2"),
                                            ("h256_40", 2, "1,1"), ("tiny_plain_37_release", 2, None)])
def test_ranks_equal_one_process(fx, ranks, split, ggufs, tmp_path):
    m = json.loads((ORACLE / fx / "meta.json").read_text())
    model = ggufs(m["model"])
    for mode in ("prefill", "decode", "chunk:5"):
        one = dump(model, fx, tmp_path / "one.f32", m["release"], mode, backend="--cpu")
        port = free_port()
        ws = workers(ranks, port)
        extra = ["--ranks", str(ranks), "--rendezvous", f"127.0.0.1:{port}"] + (["--split", split] if split else [])
        got = dump(model, fx, tmp_path / "r.f32", m["release"], mode, extra)
        for rc, err in finish(ws):
            assert rc == 0 and "rank 0 finished" in err, err
        assert np.array_equal(one, got), f"{fx} {mode} ranks {ranks}: logits differ"


def test_ranks_with_mtp_beside_the_last_part(ggufs, tmp_path):
    """The MTP block binds in the worker that holds the head; greedy with MTP over 2 ranks equals greedy without
    MTP in one process."""
    from test_mtp import make_mtp
    fx = "tiny_yarn_48_release"
    model = ggufs("tiny_yarn")
    mtp = make_mtp(model, tmp_path / "mtp.gguf", seed=3)
    base = [prog("ds4"), "-m", str(model), "--prompt-tokens-file", str(ORACLE / fx / "tokens.txt"),
            "--dump-logits", str(tmp_path / "l.f32"), "--dump-greedy", "16"]
    ref = subprocess.run(base + ["--cpu"], capture_output=True, text=True, timeout=300)
    port = free_port()
    ws = workers(2, port)
    got = subprocess.run(base + ["--strict-backend", "--ranks", "2", "--rendezvous", f"127.0.0.1:{port}", "--split",
                                 "2,3", "--mtp", str(mtp), "--mtp-draft", "3", "--mtp-gate", "0"],
                         capture_output=True, text=True, timeout=300)
    finish(ws)
    assert ref.returncode == 0 and got.returncode == 0, ref.stderr + got.stderr
    assert "ds4: mtp:" in got.stderr and " drafts 0," not in got.stderr, got.stderr
    g = lambda r: [x for x in r.stdout.splitlines() if x.startswith("greedy:")]  # noqa: E731
    assert g(ref) == g(got), (g(ref), g(got))


def test_server_over_ranks_and_a_worker_that_dies(tmp_path):
    """ds4-server with its blocks over 2 ranks answers like one process; when the worker is killed the next
    request fails with a clear error (no hang) and the server exits with status 1, since only a restart of every
    rank recovers (it answered 503 forever while /v1/models looked healthy)."""
    from test_server import NO_THINK, Server, user
    ref = None
    with Server() as s:
        ref = s.openai().chat.completions.create(model="deepseek-v4-flash", messages=user("Tell me a story"),
                                                 max_tokens=16, temperature=0, extra_body=NO_THINK)
    port = free_port()
    ws = workers(2, port, backend="--cpu")
    with Server("--ranks", "2", "--rendezvous", f"127.0.0.1:{port}", "--split", "2,4") as s:
        c = s.openai()
        r = c.chat.completions.create(model="deepseek-v4-flash", messages=user("Tell me a story"), max_tokens=16,
                                      temperature=0, extra_body=NO_THINK)
        assert r.choices[0].message.content == ref.choices[0].message.content
        ws[0].send_signal(signal.SIGKILL)
        ws[0].wait()
        import openai
        t0 = time.time()
        with pytest.raises(openai.APIError):
            c.with_options(max_retries=0).chat.completions.create(
                model="deepseek-v4-flash", messages=user("Something else entirely"), max_tokens=8, temperature=0,
                extra_body=NO_THINK)
        assert time.time() - t0 < 60
        assert s.wait_log(r"connection to the worker was lost"), s.log_text()[-2000:]
        # nothing can recover without restarting every rank: the server exits 1 (a supervisor restarts it)
        assert s.proc.wait(60) == 1, s.log_text()[-2000:]
        assert "a worker rank was lost; shutting down with status 1" in s.log_text()


def test_rank_errors_are_clear(ggufs, tmp_path):
    model = ggufs("tiny_yarn")
    run = lambda *a, t=60: subprocess.run([prog("ds4"), *a], capture_output=True, text=True, timeout=t)  # noqa: E731
    # nobody comes
    port = free_port()
    r = run("-m", str(model), "--cpu", "--ranks", "2", "--rendezvous", f"127.0.0.1:{port}", "--rank-timeout", "2",
            "-p", "hi", "-n", "1")
    assert r.returncode == 1 and "0 of 1 workers connected within 2 s" in r.stderr, r.stderr
    # options
    for args, want in [(["--ranks", "2"], "--ranks needs --rendezvous"),
                       (["--ranks", "2", "--rendezvous", "nohost"], "expected HOST:PORT"),
                       (["--ranks", "9", "--rendezvous", "127.0.0.1:1"], "is not a number 1..8"),
                       (["--ranks", "2", "--rendezvous", "127.0.0.1:1", "--split", "1,1,3"], "--split names 3 parts")]:
        r = run("-m", str(model), "--cpu", *args, "-p", "hi", "-n", "1")
        assert r.returncode == 2 and want in r.stderr, (args, r.stderr)  # usage errors, before the model loads
    r = run("--worker", "127.0.0.1:1", "--cpu")
    assert r.returncode == 2 and "--worker needs --rank" in r.stderr, r.stderr
    for hp in ("127.0.0.1:0", "127.0.0.1:", "nohost", ":1", "127.0.0.1:+1", "127.0.0.1:70000"):
        r = run("--worker", hp, "--rank", "1", "--cpu")  # refused at once, not retried until the timeout
        assert r.returncode == 2 and "expected HOST:PORT" in r.stderr, (hp, r.stderr)
    # a worker with no rank 0 gives up
    r = run("--worker", f"127.0.0.1:{free_port()}", "--rank", "1", "--cpu", "--rank-timeout", "1")
    assert r.returncode == 1 and "cannot connect within 1 s" in r.stderr, r.stderr
    # a stranger on the port and a duplicate rank are turned away; the real workers are served
    port = free_port()
    p = subprocess.Popen([prog("ds4"), "-m", str(model), "--cpu", "--ranks", "3", "--rendezvous", f"127.0.0.1:{port}",
                          "--prompt-tokens-file", str(ORACLE / "tiny_yarn_48" / "tokens.txt"), "--dump-logits",
                          str(tmp_path / "x.f32")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # rank 0 listens
    ws = workers(2, port, backend="--cpu")  # the real rank 1
    time.sleep(1.0)
    dup = workers(2, port, backend="--cpu")  # a second rank 1
    assert dup[0].wait(timeout=30) == 1
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"x" * 64)
    ws += [subprocess.Popen([prog("ds4"), "--worker", f"127.0.0.1:{port}", "--rank", "2", "--cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "refused a second worker of rank 1" in err, err
    codes = finish(ws + dup)
    assert [rc for rc, _ in codes] == [0, 0, 1], codes
    assert "refused rank 1" in codes[2][1], codes


def test_rank0_that_dies_ends_its_workers(tmp_path):
    from test_server import demo_model
    model = demo_model()
    port = free_port()
    ws = workers(2, port, backend="--cpu")
    p = subprocess.Popen([prog("ds4"), "-m", str(model), "--cpu", "--ranks", "2", "--rendezvous", f"127.0.0.1:{port}",
                          "-p", "hi", "-n", "1000000", "--temp", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    # killed as soon as its first generated text arrives: mid-generation, workers attached (a fixed sleep lost the
    # race on a fast machine: the demo model's whole context, ~200 tokens, took about a second)
    first = p.stdout.read(1)
    assert first and p.poll() is None, (first, p.communicate())
    p.kill()
    p.communicate()
    (rc, err), = finish(ws)
    assert rc == 1 and "rank 0 closed the connection" in err, err


def test_a_worker_with_another_model_is_refused(ggufs, tmp_path):
    """A worker that binds a different file (here another fixture model given with -m) is refused at bind: the
    fingerprints of the GGUF headers differ. Without the check it would compute its blocks with other weights."""
    model = ggufs("tiny_yarn")
    other = tmp_path / "tiny_yarn-q8.gguf"  # the same blocks and shapes, other tensor types
    c = convert(ORACLE / "models" / "tiny_yarn", other, "q8_0")
    assert c.returncode == 0, c.stderr
    port = free_port()
    w = subprocess.Popen([prog("ds4"), "--worker", f"127.0.0.1:{port}", "--rank", "1", "--cpu", "-m", str(other),
                          "--rank-timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    r = subprocess.run([prog("ds4"), "-m", str(model), "--cpu", "--ranks", "2", "--rendezvous", f"127.0.0.1:{port}",
                        "--split", "1,4", "-p", "hi", "-n", "1"], capture_output=True, text=True,
                       timeout=120)
    finish([w])
    assert r.returncode == 1, r.stderr
    assert "the worker's model is not rank 0's" in r.stderr, r.stderr


def test_a_worker_that_stops_answering_is_lost_after_the_rank_timeout(tmp_path):
    """A worker that stops (SIGSTOP: its socket stays open) fails rank 0 after --rank-timeout seconds with a clear
    error instead of a hang."""
    from test_server import demo_model
    port = free_port()
    ws = workers(2, port, backend="--cpu")
    p = subprocess.Popen([prog("ds4"), "-m", str(demo_model()), "--cpu", "--ranks", "2", "--rendezvous",
                          f"127.0.0.1:{port}", "--rank-timeout", "3", "-p", "hi", "-n", "100000", "--temp", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = p.stdout.read(1)  # generating (a fixed sleep could outlast the demo model's ~200-token context)
    assert first, p.communicate()
    ws[0].send_signal(signal.SIGSTOP)
    try:
        _, err = p.communicate(timeout=60)
    finally:
        ws[0].send_signal(signal.SIGCONT)
        ws[0].kill()
        ws[0].communicate()
    assert p.returncode == 1 and "did not answer within 3 s" in err, err


def test_a_worker_that_stops_reading_a_large_request_is_lost_after_the_rank_timeout(tmp_path):
    """A stopped worker's kernel keeps the connection open with a zero window, so rank 0 blocks in a send, not a
    read, once a request is larger than the socket buffers (a large prefill chunk hands over megabytes of HC
    states): sends have the same deadline as replies. A relay between the two passes everything until the first
    request over 1 MB, then stops reading from rank 0 (what a SIGSTOPped worker does) while keeping the socket."""
    import struct
    import threading
    from test_server import demo_model
    port, wport = free_port(), free_port()
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", wport))
    ls.listen(1)
    stalled = threading.Event()

    def rx(c, n):
        b = b""
        while len(b) < n:
            k = c.recv(n - len(b))
            if not k:
                raise EOFError
            b += k
        return b

    def relay():
        try:
            w, _ = ls.accept()
            r0 = socket.create_connection(("127.0.0.1", port))
            r0.sendall(rx(w, 16))  # the worker's hello
            w.sendall(rx(r0, 16))  # rank 0's answer

            def back():  # replies, unchanged
                try:
                    while True:
                        b = w.recv(1 << 16)
                        if not b:
                            break
                        r0.sendall(b)
                except OSError:
                    pass
            threading.Thread(target=back, daemon=True).start()
            while True:
                h = rx(r0, 40)
                n = struct.unpack(REQ, h)[5]
                if n > (1 << 20):
                    stalled.set()
                    time.sleep(120)  # the socket stays open; nothing more is read from rank 0
                    return
                w.sendall(h + rx(r0, n))
        except (OSError, EOFError):
            pass

    threading.Thread(target=relay, daemon=True).start()
    p = subprocess.Popen([prog("ds4-bench"), "-m", str(demo_model()), "--cpu", "--ranks", "2", "--rendezvous",
                          f"127.0.0.1:{port}", "--rank-timeout", "4", "--ctx-start", "8192", "--ctx-max", "8192",
                          "--prefill-chunk", "8192", "--gen-tokens", "4"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    ws = workers(2, wport, backend="--cpu", extra=("-t", "1"))
    try:
        _, err = p.communicate(timeout=90)
    finally:
        for w in ws:
            w.kill()
            w.communicate()
        ls.close()
    assert stalled.is_set(), "no request over 1 MB: the test does not reach the send path"
    assert p.returncode == 1 and "the connection to the worker was lost" in err, err


REQ = "<IIQQQQ"   # op, k, a, b, c, len (src/remote.c req)
REP = "<iIQQ"     # rc, msg_len, r0, len (rep)
BIND = "<iiiiiiQIIII"  # l0, l1, first, last, mtp, synthetic, seed, path_len, mtp_len, syn_len, pad (bind_req)
OP_BIND, OP_RESERVE, OP_BYE = 1, 4, 20


class FakeRank0:
    """Rank 0's side of the channel, spoken by the test (a hostile or broken rank 0)."""

    def __init__(self, backend="--strict-backend"):
        import struct
        self.struct = struct
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        port = ls.getsockname()[1]
        self.w = subprocess.Popen([prog("ds4"), "--worker", f"127.0.0.1:{port}", "--rank", "1", backend,
                                   "--rank-timeout", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ls.settimeout(30)
        self.s, _ = ls.accept()
        ls.close()
        self.s.settimeout(60)
        magic, version, rank, _ = struct.unpack("<IIii", self.rx(16))
        assert rank == 1
        self.s.sendall(struct.pack("<IIii", magic, version, 0, 0))  # the worker's own build: accepted

    def rx(self, n):
        b = b""
        while len(b) < n:
            k = self.s.recv(n - len(b))
            assert k, "the worker closed the connection"
            b += k
        return b

    def call(self, op, k=0, a=0, b=0, payload=b""):
        self.s.sendall(self.struct.pack(REQ, op, k, a, b, 0, len(payload)) + payload)
        rc, ml, r0, n = self.struct.unpack(REP, self.rx(24))
        msg = self.rx(ml).decode(errors="replace")
        self.rx(n)
        return rc, msg

    def bind(self, path, mtp=b"", l0=0, l1=1, first=1, last=1):
        path = str(path).encode()
        mtp = str(mtp).encode() if mtp else b""
        return self.struct.pack(BIND, l0, l1, first, last, 1 if mtp else 0, 0, 0, len(path), len(mtp), 0, 0) + \
            path + mtp

    def close(self):
        try:
            self.s.sendall(self.struct.pack(REQ, OP_BYE, 0, 0, 0, 0, 0))
        except OSError:
            pass
        self.s.close()
        _, err = self.w.communicate(timeout=60)
        return self.w.returncode, err


def test_worker_answers_malformed_binds_and_keeps_the_binding_it_has(tmp_path):
    """A short or inconsistent bind request gets an error reply (the worker stays up); a second MTP bind is refused
    and leaves the MTP block already bound in place."""
    from test_mtp import make_mtp
    from test_server import demo_model
    model = demo_model()
    mtp = make_mtp(model, tmp_path / "mtp.gguf", seed=3)
    f = FakeRank0()
    try:
        rc, msg = f.call(OP_BIND, payload=b"\0" * 10)
        assert rc < 0 and "short bind request" in msg, (rc, msg)
        good = f.bind(model)
        rc, msg = f.call(OP_BIND, payload=good + b"xx")
        assert rc < 0 and "malformed bind request" in msg, (rc, msg)
        import gguf
        n_layer = int(gguf.GGUFReader(str(model)).fields["deepseek4.block_count"].parts[-1][0])
        rc, msg = f.call(OP_BIND, payload=f.bind(model, l0=0, l1=n_layer))
        assert rc == 0, msg
        rc, msg = f.call(OP_BIND, payload=f.bind(model, mtp=mtp))
        assert rc == 0, msg
        assert f.call(OP_RESERVE, k=1, a=4, b=64) == (0, "")
        rc, msg = f.call(OP_BIND, payload=f.bind(model, mtp=mtp))
        assert rc < 0 and "bound already" in msg, (rc, msg)
        rc, msg = f.call(OP_RESERVE, k=1, a=4, b=64)
        assert rc == 0, f"the refused bind took the MTP binding away: {msg}"
    finally:
        rc, err = f.close()
    assert rc == 0, err


def test_a_worker_that_restarts_during_the_rendezvous_takes_its_rank_back(tmp_path):
    """A worker that connects, goes away before the rendezvous ends and connects again is accepted (its first
    registration is dropped), and the run completes."""
    from test_server import demo_model
    port = free_port()
    p = subprocess.Popen([prog("ds4"), "-m", str(demo_model()), "--cpu", "--ranks", "3", "--rendezvous",
                          f"127.0.0.1:{port}", "--rank-timeout", "30", "-p", "hi", "-n", "2", "--temp", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    first = workers(2, port, backend="--cpu")[0]
    time.sleep(1.0)
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=30)
    again = workers(2, port, backend="--cpu")[0]
    time.sleep(1.0)
    assert again.poll() is None, again.communicate()
    w2 = subprocess.Popen([prog("ds4"), "--worker", f"127.0.0.1:{port}", "--rank", "2", "--cpu", "--rank-timeout",
                           "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = p.communicate(timeout=120)
    res = finish([again, w2])
    assert p.returncode == 0, err
    assert "rank 1 connected again" in err, err
    assert all(rc == 0 for rc, _ in res), res


def test_idle_connections_to_the_rendezvous_do_not_hold_up_the_workers(tmp_path):
    """Connections that never say hello (a port scanner, a stuck client, a slowloris) are served beside the
    workers: the rendezvous used to read one connection's hello at a time with 5 s for each, so 8 idle
    connections ahead of the workers delayed the run by ~40 s. Now it completes in about the time a plain run
    takes, and the idle connections are closed."""
    from test_server import demo_model
    port = free_port()
    p = subprocess.Popen([prog("ds4"), "-m", str(demo_model()), "--cpu", "--ranks", "3", "--rendezvous",
                          f"127.0.0.1:{port}", "--rank-timeout", "30", "-p", "hi", "-n", "2", "--temp", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    idle = []
    t_end = time.time() + 20
    while not idle and time.time() < t_end:
        try:
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            time.sleep(0.1)
    assert idle, "rank 0 never listened"
    idle += [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(7)]
    idle[0].sendall(b"DS4")  # part of a hello, never finished
    t0 = time.time()
    ws = workers(3, port, backend="--cpu")
    try:
        _, err = p.communicate(timeout=120)
    finally:
        res = finish(ws)
    took = time.time() - t0
    assert p.returncode == 0, err
    assert all(rc == 0 for rc, _ in res), res
    assert took < 15, f"the rendezvous waited on the idle connections: {took:.1f} s"
    for s in idle:  # rank 0 closed them (or exited): reads end
        s.settimeout(10)
        try:
            assert s.recv(16) == b""
        except ConnectionResetError:
            pass
        s.close()


def test_a_worker_that_comes_after_a_quiet_spell_is_taken(tmp_path):
    """A worker that connects more than 5 s after rank 0 began waiting is taken (a review found the concurrent
    rendezvous timing its hello from before the long poll: such a worker was closed unanswered and exited with
    'rank 0 refused')."""
    from test_server import demo_model
    port = free_port()
    p = subprocess.Popen([prog("ds4"), "-m", str(demo_model()), "--cpu", "--ranks", "2", "--rendezvous",
                          f"127.0.0.1:{port}", "--rank-timeout", "40", "-p", "hi", "-n", "2", "--temp", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(7)
    ws = workers(2, port, backend="--cpu")
    try:
        _, err = p.communicate(timeout=120)
    finally:
        res = finish(ws)
    assert p.returncode == 0, err
    assert all(rc == 0 for rc, _ in res), res


def test_a_worker_with_other_weights_under_the_same_header_is_refused(tmp_path):
    """Two demo models of other seeds have byte-identical headers and tensor tables; the worker's identity samples
    every tensor's data too, so the one with other weights is refused (it computed its blocks with them)."""
    from test_server import demo_model
    other = tmp_path / "demo-seed2.gguf"
    r = subprocess.run([prog("ds4-convert"), "--demo", "-o", str(other), "--tokenizer",
                        str(ROOT / "tests" / "data" / "deepseek-v3-tokenizer.json"), "--seed", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    port = free_port()
    w = subprocess.Popen([prog("ds4"), "--worker", f"127.0.0.1:{port}", "--rank", "1", "--cpu", "-m", str(other),
                          "--rank-timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    r = subprocess.run([prog("ds4"), "-m", str(demo_model()), "--cpu", "--ranks", "2", "--rendezvous",
                        f"127.0.0.1:{port}", "-p", "hi", "-n", "1"], capture_output=True, text=True, timeout=120)
    finish([w])
    assert r.returncode == 1 and "the worker's model is not rank 0's" in r.stderr, r.stderr


def _hostile_rank0(port, ack_version=None):
    """Listens as rank 0, takes one worker's hello and acks it (its own version unless told otherwise); returns
    (socket, the worker's protocol version)."""
    import struct
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(1)
    ls.settimeout(60)
    c, _ = ls.accept()
    ls.close()
    c.settimeout(60)
    magic, ver, rank, _ = struct.unpack("<IIii", c.recv(16, socket.MSG_WAITALL))
    c.sendall(struct.pack("<IIii", magic, ver if ack_version is None else ack_version, 0, 0))
    return c, ver


def test_worker_refuses_what_no_rank_0_sends():
    """A worker checks a request's header before reading or reserving its payload: an op that carries no payload
    announcing 16 GiB (it reserved that much first), an unknown op and any op before the bind end the worker with
    a message, at once and without the memory. A rank 0 acking another protocol version is refused."""
    import struct
    REQ = struct.Struct("<IIQQQQ")
    OP_DESCRIBE, OP_STAGE = 18, 19
    for op, ln, want in ((OP_DESCRIBE, 1 << 34, "a request before binding a model"),
                         (99, 0, "an unknown request"),
                         (OP_STAGE, 64, "a request before binding a model")):
        port = free_port()
        w = workers(2, port, backend="--cpu")[0]
        c, _ = _hostile_rank0(port)
        c.sendall(REQ.pack(op, 0, 0, 0, 0, ln))
        out, err = w.communicate(timeout=30)
        c.close()
        assert w.returncode == 1 and want in err, (op, w.returncode, err)
    port = free_port()
    w = workers(2, port, backend="--cpu")[0]
    c, ver = _hostile_rank0(port, ack_version=12345)
    out, err = w.communicate(timeout=30)
    c.close()
    assert w.returncode == 1 and "a different ds4 build" in err, err
