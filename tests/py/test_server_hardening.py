"""ds4-server under attack (issue 14), tested from the client's side with raw
sockets against the demo model: shutdown drain, slow clients, early API-key
refusal, a busy port, browser-reachable requests (Content-Type and Host),
forced tool calls naming unknown functions, duplicate Content-Length.

The measurements behind the issue's before/after numbers run by hand, e.g.
    .venv/bin/python tests/py/test_server_hardening.py sigterm --rounds 20 --load 4
    .venv/bin/python tests/py/test_server_hardening.py slowloris
    .venv/bin/python tests/py/test_server_hardening.py uploads
(DS4_TEST_SERVER_BIN=path runs them against another build).
"""
import argparse
import http.client
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_server import Server, user  # noqa: E402


def rss_kib(pid, field="VmRSS"):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def post_bytes(port, path, body, extra=b"", host=b"127.0.0.1", ctype=b"application/json"):
    """The bytes of one POST request (Host and Content-Type overridable)."""
    h = b"POST " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\n"
    if ctype is not None:
        h += b"Content-Type: " + ctype + b"\r\n"
    return h + b"Content-Length: %d\r\n" % len(body) + extra + b"\r\n" + body


def read_all(sock, timeout=60):
    """Everything the server sends until it closes (or timeout); never raises
    on a reset."""
    sock.settimeout(timeout)
    got = b""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            d = sock.recv(65536)
        except (socket.timeout, ConnectionResetError):
            break
        if not d:
            break
        got += d
    return got


def status_of(resp):
    m = re.match(rb"HTTP/1\.[01] (\d{3})", resp)
    return int(m.group(1)) if m else None


def cpu_load(n):
    """n busy child processes (a loaded machine); returns their Popen objects."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_load(procs):
    for p in procs:
        p.kill()
        p.wait()


def test_server_signal_while_starting_exits_at_once():
    """Signals were blocked from the first line of main until the server listened: Ctrl-C (twice) during a model
    load waited for the whole load (minutes for the real model), then shut down with status 0, the second signal
    lost. Now a signal while starting exits at once with 128 + the signal; once listening, the first is an orderly
    shutdown and the second exits 130, so two SIGINTs 10 ms apart give 130 either way."""
    from test_server import demo_model, prog
    for _ in range(3):
        p = subprocess.Popen([prog("ds4-server"), "-m", demo_model(), "--cpu", "--port", "0", "--ctx", "4096"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        time.sleep(0.01)
        p.send_signal(signal.SIGINT)
        try:
            _, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
        assert p.returncode == 130, (p.returncode, err[-2000:])


def test_server_stalled_reader_does_not_get_a_complete_stream():
    """A streaming client that stops reading makes the worker give up its writes (finish error, logged); what the
    client had not yet read then ended as a complete chunked 200 without a finish or [DONE] when it read again,
    which the openai SDK takes as a whole reply. Now the connection is cut there: no end-of-stream chunk, so a
    client sees the stream broken."""
    # the reply must outlast the kernel's socket buffers by more than the server's 10 s stall limit however
    # fast the machine decodes: at 277 tok/s the limit fired at token 3,736, so a 3,500-token reply was whole
    # in the server's queue by then and no write ever failed (the test waited out its 150 s)
    body = json.dumps({"messages": user("Tell me about cats."), "max_tokens": 30000, "temperature": 0,
                       "think": False, "stream": True, "logprobs": True, "top_logprobs": 20}).encode()
    with Server(ctx=32768) as s:
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        c.connect(("127.0.0.1", s.port))
        c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.time() + 150
        while "finish=error client stream write failed" not in s.log_text():
            assert time.time() < deadline, s.log_text()[-2000:]
            time.sleep(0.5)
        raw = b""
        c.settimeout(30)
        while True:
            try:
                d = c.recv(1 << 20)
            except (ConnectionResetError, socket.timeout):
                break
            if not d:
                break
            raw += d
        c.close()
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    assert not raw.endswith(b"\r\n0\r\n\r\n") and b"[DONE]" not in raw, raw[-300:]


def test_server_sigterm_during_a_streamed_prefill_says_shutdown():
    """A stream whose prompt is still being prefilled when SIGTERM comes ends with an error event; its message was
    the engine's "cancelled" where a generation stopped by the same signal says "shutdown requested" (spec
    SERVING B.1). Both say the same now."""
    body = json.dumps({"messages": user("The quick brown fox jumps over the lazy dog. " * 1500), "max_tokens": 8,
                       "temperature": 0, "think": False, "stream": True})
    with Server(ctx=32768) as s:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=120)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()  # the SSE headers come after the first prefill chunk
        assert resp.status == 200
        s.proc.send_signal(signal.SIGTERM)
        data = resp.read()
        conn.close()
    assert b"shutdown requested" in data and b"cancelled" not in data, data[-500:]


# ---- 1. SIGTERM drains connections -------------------------------------------

def sigterm_round(server_args=(), n_queued=6, timeout=60):
    """One running stream and n_queued queued requests, then SIGTERM. Returns
    (stream_complete, n_queued_503, exit_code, detail)."""
    s = Server(*server_args)
    try:
        body = json.dumps({"messages": user("Write forever"), "max_tokens": 3000,
                           "stream": True, "think": False}).encode()
        run = socket.create_connection(("127.0.0.1", s.port))
        run.sendall(post_bytes(s.port, b"/v1/chat/completions", body))
        got = b""
        run.settimeout(60)
        while got.count(b"data:") < 3:
            d = run.recv(4096)
            if not d:
                break
            got += d
        queued = []
        for k in range(n_queued):
            q = socket.create_connection(("127.0.0.1", s.port))
            qb = json.dumps({"messages": user("queued %d" % k), "max_tokens": 50,
                             "stream": k % 2 == 0, "think": False}).encode()
            q.sendall(post_bytes(s.port, b"/v1/chat/completions", qb))
            queued.append(q)
        time.sleep(0.5)  # parsed and queued behind the running stream
        s.proc.send_signal(signal.SIGTERM)
        results = {}

        def drain(name, sock):
            results[name] = read_all(sock, timeout)
            sock.close()

        threads = [threading.Thread(target=drain, args=("run", run))]
        threads += [threading.Thread(target=drain, args=(k, q)) for k, q in enumerate(queued)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stream = got + results["run"]
        complete = b'"finish_reason":"error"' in stream and b"data: [DONE]" in stream
        n503 = 0
        bad = []
        for k in range(n_queued):
            r = results[k]
            # a 503 says when to retry (Retry-After, honoured by the OpenAI and Anthropic SDKs)
            if status_of(r) == 503 and b"server shutting down" in r and b"\r\nRetry-After: 1\r\n" in r:
                n503 += 1
            else:
                bad.append(r[:120])
        try:
            rc = s.proc.wait(60)
        except subprocess.TimeoutExpired:
            rc = None
        return complete, n503, rc, {"stream_tail": stream[-200:], "queued_bad": bad}
    finally:
        s.stop()


def test_server_sigterm_drains_slow_connection_threads():
    """Every connection thread sleeps before each write (a loaded machine
    where the worker finishes before the connection threads run): after
    SIGTERM the running stream still ends with its error finish and [DONE],
    and every queued request gets its 503 body, then the server exits 0."""
    complete, n503, rc, detail = sigterm_round(("--debug-slow-connection-ms", "300"), n_queued=4)
    assert complete, detail
    assert n503 == 4, detail
    assert rc == 0


# ---- 2. slow clients -----------------------------------------------------------

def slowloris(n, src="127.0.0.1", port=0, interval=3.0, stop=None, opened=None):
    """Opens up to n connections from src that send one header line every
    interval seconds and never finish; reconnects the ones the server closes.
    Runs until stop is set; opened[0] counts connections the server holds."""
    socks = []

    def connect():
        s = socket.socket()
        s.setblocking(True)
        s.bind((src, 0))
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        except OSError:
            s.close()
            return None
        return s

    k = 0
    while not stop.is_set():
        while len(socks) < n and not stop.is_set():
            s = connect()
            if s is None:
                break
            socks.append(s)
        t_next = time.time() + interval
        alive = []
        for s in socks:
            try:
                s.sendall(b"X-Slow-%d: %s\r\n" % (k, b"a" * 8))
                r, _, _ = select.select([s], [], [], 0)
                if r and not s.recv(1, socket.MSG_PEEK):
                    raise OSError("closed")
                alive.append(s)
            except OSError:
                s.close()
        socks = alive
        if opened is not None:
            opened[0] = len(socks)
        k += 1
        while time.time() < t_next and not stop.is_set():
            time.sleep(0.05)
    for s in socks:
        s.close()


def timed_models(port, timeout=10):
    """GET /v1/models from 127.0.0.1; (status or error text, seconds)."""
    t0 = time.time()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request("GET", "/v1/models")
        st = c.getresponse().status
        c.close()
        return st, time.time() - t0
    except Exception as e:  # the attack's effect is the failure
        return repr(e), time.time() - t0


def slowloris_served(server, n=520, src="127.0.0.2", interval=3.0, settle=8.0):
    """Runs the attack, then one normal request; returns (result, seconds,
    connections the attacker held)."""
    stop = threading.Event()
    opened = [0]
    t = threading.Thread(target=slowloris, kwargs=dict(n=n, src=src, port=server.port,
                                                       interval=interval, stop=stop,
                                                       opened=opened))
    t.start()
    try:
        time.sleep(settle)
        st, dt = timed_models(server.port)
        return st, dt, opened[0]
    finally:
        stop.set()
        t.join()


def test_server_slow_header_clients_do_not_lock_out_others():
    """520 connections trickling a header line every 3 s (the connection
    limit is 512) from another address, then from the victim's own: a
    normal request from 127.0.0.1 is served during both attacks."""
    with Server() as s:
        for src in ("127.0.0.2", "127.0.0.1"):
            st, dt, held = slowloris_served(s, n=520, src=src, interval=3.0, settle=5.0)
            assert st == 200, (src, st, held)
            # the per-client cap, plus connections still in the kernel's listen
            # backlog (128), which the attacker counts as open
            assert held <= 64 + 128, (src, held)
        assert s.wait_log(r"over the cap of 64 per client", timeout=15)
        assert s.alive()
        st, _, _ = s.raw("POST", "/v1/chat/completions",
                         {"messages": user("hi"), "max_tokens": 2, "think": False})
        assert st == 200


def test_server_idle_sockets_from_many_addresses_do_not_lock_out_others():
    """60 idle sockets from each of 9 addresses (540, each address under its cap of 64, together over the server's
    512): a normal request from a tenth address is served, the oldest idle socket making room (an outside pass
    found every new client reset for as long as the attacker reconnected every 10 s)."""
    with Server() as s:
        held = []
        try:
            for a in range(2, 11):
                for _ in range(60):
                    c = socket.socket()
                    c.bind(("127.0.0.%d" % a, 0))
                    c.settimeout(5)
                    try:
                        c.connect(("127.0.0.1", s.port))
                    except OSError:
                        c.close()
                        continue
                    held.append(c)
            time.sleep(1.0)  # past the grace: every idle socket may now be cut for a newcomer
            body = json.dumps({"messages": user("hi"), "max_tokens": 2, "think": False}).encode()
            c = socket.socket()
            c.bind(("127.0.0.99", 0))
            c.connect(("127.0.0.1", s.port))
            c.sendall(post_bytes(s.port, b"/v1/chat/completions", body))
            resp = read_all(c, 30)
            c.close()
            assert status_of(resp) == 200, resp[:300]
            assert s.wait_log(r"at the server's limit of 512 connections", timeout=15)
        finally:
            for c in held:
                c.close()
        assert s.alive()


def test_server_request_deadline_is_absolute():
    """--request-timeout counts from the accept: a client trickling header
    lines, or a body, every 0.5 s is cut at the deadline although each byte
    would restart an idle timeout; a long generation after its request is in
    is not."""
    with Server("--request-timeout", "3") as s:
        def trickle(head, piece):
            c = socket.create_connection(("127.0.0.1", s.port))
            c.sendall(head)
            t0 = time.time()
            while time.time() - t0 < 20:
                try:
                    c.sendall(piece)
                except OSError:
                    break
                r, _, _ = select.select([c], [], [], 0.5)
                if r:
                    try:
                        if not c.recv(4096):
                            break
                    except OSError:
                        break
            c.close()
            return time.time() - t0
        dt = trickle(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"X-Slow: a\r\n")
        assert 2.0 < dt < 8.0, dt
        dt = trickle(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 100000\r\n\r\n", b" ")
        assert 2.0 < dt < 8.0, dt
        assert s.wait_log(r"did not send a complete request within 3 s", timeout=15)
        # a stream that runs past the deadline once its request is in
        # (seeded: an unseeded sample may draw the end token early, and then
        # the stream ends, rightly, before the deadline)
        body = json.dumps({"messages": user("Write forever"), "max_tokens": 1200, "stream": True,
                           "think": False, "seed": 7}).encode()
        c = socket.create_connection(("127.0.0.1", s.port))
        t0 = time.time()
        c.sendall(post_bytes(s.port, b"/v1/chat/completions", body))
        out = read_all(c, 120)
        c.close()
        assert b"data: [DONE]" in out, out[-300:]
        assert time.time() - t0 > 3.0 or b'"finish_reason":"length"' in out


# ---- 3. API key ------------------------------------------------------------------

def keyless_uploads(port, n=12, mib=59):
    """n concurrent uploads of mib MiB without a key; returns the statuses
    (None when the server closed without one)."""
    chunk = b" " * (1 << 20)
    out = [None] * n

    def one(k):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                  b"application/json\r\nContent-Length: %d\r\n\r\n" % (mib << 20))
        try:
            for _ in range(mib):
                s.sendall(chunk)
        except OSError:
            pass  # refused early: the server closed while we were sending
        out[k] = status_of(read_all(s, 60))
        s.close()

    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_server_api_key_checked_when_headers_arrive():
    """Without the key, a POST announcing a 59 MiB body is answered 401 before
    any body byte is sent; 12 keyless 59 MiB uploads leave the server's
    memory flat; a small keyless POST gets its 401 every time; the key
    still works."""
    with Server("--api-key", "sekrit") as s:
        c = socket.create_connection(("127.0.0.1", s.port))
        c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                  b"application/json\r\nContent-Length: %d\r\n\r\n" % (59 << 20))
        t0 = time.time()
        resp = read_all(c, 10)
        c.close()
        assert status_of(resp) == 401 and b"invalid API key" in resp, resp
        assert time.time() - t0 < 5
        rss0 = rss_kib(s.proc.pid)
        sts = keyless_uploads(s.port)
        assert all(st in (401, None) for st in sts), sts
        assert rss_kib(s.proc.pid) - rss0 < 64 * 1024
        body = {"messages": user("x"), "max_tokens": 1, "think": False}
        for _ in range(20):
            st, _, data = s.raw("POST", "/v1/chat/completions", body,
                                headers={"Authorization": "Bearer wrong"})
            assert st == 401, data
        st, _, _ = s.raw("POST", "/v1/chat/completions", body, headers={"x-api-key": "sekrit"})
        assert st == 200
        assert s.alive()


def test_server_empty_api_key_refused_at_startup():
    from test_server import demo_model, prog
    binary = os.environ.get("DS4_TEST_SERVER_BIN") or prog("ds4-server")
    r = subprocess.run([binary, "-m", demo_model(), "--cpu", "--port", "0", "--api-key", ""],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--api-key must not be empty" in r.stderr, r.stderr


def test_server_empty_string_options_refused_at_startup():
    """`--kv-disk-dir ""` (e.g. an unset variable) ran with the disk cache silently off; every string option
    now refuses an empty value."""
    from test_server import demo_model, prog
    binary = os.environ.get("DS4_TEST_SERVER_BIN") or prog("ds4-server")
    for opt in ("--kv-disk-dir", "--host", "--mtp", "--trace", "-m"):
        args = [binary, "--cpu", "--port", "0", opt, ""] + ([] if opt == "-m" else ["-m", demo_model()])
        r = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "%s must not be empty" % opt in r.stderr, (opt, r.stderr)


# ---- 5. requests a browser page can send -------------------------------------------

def raw_request(port, data, timeout=30):
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(data)
    resp = read_all(c, timeout)
    c.close()
    return status_of(resp), resp


def test_server_refuses_cross_origin_simple_posts_and_foreign_hosts():
    """A page can POST text/plain (or a form) cross-origin without a preflight,
    and a DNS-rebinding page reaches 127.0.0.1 under its own host name: such
    requests are refused before anything is generated."""
    body = json.dumps({"messages": user("x"), "max_tokens": 1, "think": False}).encode()
    with Server() as s:
        p = s.port
        origin = b"Origin: http://evil.example\r\n"
        for ctype in (b"text/plain", b"text/plain;charset=UTF-8", b"application/x-www-form-urlencoded",
                      b"multipart/form-data; boundary=x", b"application/jsonx", None):
            st, resp = raw_request(p, post_bytes(p, b"/v1/chat/completions", body, origin, ctype=ctype))
            assert st == 415 and b"Content-Type must be application/json" in resp, (ctype, resp)
        for host in (b"evil.example", b"evil.example:%d" % p, b"127.0.0.1.evil.example",
                     b"localhost.evil.example:%d" % p):
            st, resp = raw_request(p, post_bytes(p, b"/v1/chat/completions", body, host=host))
            assert st == 403 and b"Host header not allowed" in resp, (host, resp)
            st, resp = raw_request(p, b"GET /v1/models HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            assert st == 403, (host, resp)
        assert "prefill" not in s.log_text() and "generated" not in s.log_text()
        for host in (b"127.0.0.1", b"127.0.0.1:%d" % p, b"localhost:%d" % p, b"LocalHost.", b"localhost"):
            st, resp = raw_request(p, post_bytes(p, b"/v1/chat/completions", body, host=host,
                                                 ctype=b"application/json; charset=utf-8"))
            assert st == 200, (host, resp)
    with Server("--allow-host", "box.lan,other.lan", "--allow-host", "third.lan") as s:
        p = s.port
        for host, want in ((b"box.lan:%d" % p, 200), (b"OTHER.lan", 200), (b"third.lan", 200),
                           (b"localhost", 200), (b"evil.example", 403)):
            st, _ = raw_request(p, b"GET /v1/models HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            assert st == want, host
    with Server("--allow-host", "*") as s:
        st, _ = raw_request(s.port, b"GET /v1/models HTTP/1.1\r\nHost: anything.example\r\n\r\n")
        assert st == 200


# ---- 8. forced tool calls -----------------------------------------------------------

def test_server_forced_tool_choice_unknown_or_long_name():
    """A tool_choice naming a function that is not in tools is a 400 (no call
    to a tool the client lacks is generated); a forced name longer than any
    fixed buffer comes back whole, as one well-formed call."""
    import anthropic
    import openai
    tool = {"type": "function", "function": {"name": "bash", "parameters": {
        "type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}}
    with Server() as s:
        o = s.openai()
        with pytest.raises(openai.BadRequestError) as ei:
            o.chat.completions.create(model="m", messages=user("x"), tools=[tool], max_tokens=40,
                                      tool_choice={"type": "function", "function": {"name": "rm"}})
        assert ei.value.response.json()["error"]["message"] == \
            "tool_choice names function 'rm', which is not in tools"
        a = s.anthropic()
        with pytest.raises(anthropic.BadRequestError):
            a.messages.create(model="m", max_tokens=40, messages=user("x"),
                              tools=[{"name": "Bash", "input_schema": {"type": "object"}}],
                              tool_choice={"type": "tool", "name": "rm"})
        assert "generated" not in s.log_text()
        long_name = "tool_" + "abcdefghij" * 70  # 705 bytes
        # (an integer argument: the random demo model closes no string value by itself)
        long_tool = {"type": "function", "function": {"name": long_name, "parameters": {
            "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}
        r = o.chat.completions.create(model="m", messages=user("x"), tools=[tool, long_tool],
                                      tool_choice={"type": "function", "function": {"name": long_name}},
                                      max_tokens=600, temperature=0, extra_body={"think": False})
        assert r.choices[0].finish_reason == "tool_calls", r
        calls = r.choices[0].message.tool_calls
        assert len(calls) == 1 and calls[0].function.name == long_name
        assert isinstance(json.loads(calls[0].function.arguments)["n"], int)


# ---- 9. request framing ------------------------------------------------------------

def test_server_differing_content_lengths_get_400():
    """Two Content-Length headers with different values (RFC 9112 6.3) are a
    400 whichever comes first; identical duplicates are one length."""
    body = json.dumps({"messages": user("x"), "max_tokens": 1, "think": False}).encode()
    n = len(body)
    with Server() as s:
        for extra in (b"Content-Length: %d\r\n" % (n + 40), b"Content-Length: %d\r\n" % (n - 10),
                      b"content-length: 0\r\n"):
            st, resp = raw_request(s.port, post_bytes(s.port, b"/v1/chat/completions", body, extra), 10)
            assert st == 400 and b"bad HTTP request" in resp, (extra, resp)
        # the differing value first
        data = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                b"\r\nContent-Length: 2\r\nContent-Length: %d\r\n\r\n" % n) + body
        st, resp = raw_request(s.port, data, 10)
        assert st == 400 and b"bad HTTP request" in resp, resp
        assert "prefill" not in s.log_text()
        st, resp = raw_request(s.port, post_bytes(s.port, b"/v1/chat/completions", body,
                                                  b"Content-Length: %d\r\n" % n))
        assert st == 200, resp
        assert s.alive()


def test_server_encoded_nul_in_the_path_is_not_cut_off():
    """A path with %00 (libmicrohttpd decodes it to a NUL) was served as the path before it
    (/v1/chat/completions%00junk ran a completion), though a proxy's path rules saw another path: now a 404.
    Other escapes still decode (/v1/model%73 is /v1/models)."""
    body = json.dumps({"messages": user("x"), "max_tokens": 1, "think": False}).encode()
    with Server() as s:
        for path in (b"/v1/chat/completions%00junk", b"/v1/messages%00.json"):
            st, resp = raw_request(s.port, post_bytes(s.port, path, body), 10)
            assert st == 404, (path, resp)
        st, resp = raw_request(s.port, b"GET /v1/models/deepseek-v4-flash%00x HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                        b"Connection: close\r\n\r\n", 10)
        assert st == 404, resp
        st, resp = raw_request(s.port, b"GET /v1/model%73 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", 10)
        assert st == 200 and b"deepseek" in resp, resp
        assert "prefill" not in s.log_text()


def test_server_huge_prompts_are_refused_before_tokenizing():
    """A prompt that cannot fit whatever its tokens (each covers at most the vocabulary's longest byte string) is
    the context error at once, not after the tokenizer's ~60 bytes of scratch per byte: an outside pass sent six
    60 MiB prompts of one letter at once and the server held 11.5 GiB for 84 s. The error says the count is a bound;
    Anthropic's wording stays the one Claude Code parses; the server's memory stays small; a prompt near the
    context is still counted exactly."""
    with Server(ctx=512) as s:
        big = "x" * (24 << 20)
        hwm0 = rss_kib(s.proc.pid, "VmHWM")
        st, _, data = s.raw("POST", "/v1/chat/completions", {"messages": user(big), "max_tokens": 2}, timeout=120)
        err = json.loads(data)["error"]
        assert st == 400 and err["code"] == "context_length_exceeded", data[:300]
        assert re.fullmatch(r"Prompt has at least \d+ tokens, but the configured context size is 512 tokens",
                            err["message"]), err
        st, _, data = s.raw("POST", "/v1/messages", {"model": "m", "max_tokens": 2, "messages": user(big)},
                            timeout=120)
        msg = json.loads(data)["error"]["message"]
        assert st == 400 and re.fullmatch(r"prompt is too long: \d+ tokens > 511 maximum", msg), msg
        # the peak: the body itself (24 MiB, parsed and rendered); tokenizing it would take over 1 GiB
        assert rss_kib(s.proc.pid, "VmHWM") - hwm0 < 400 * 1024, (hwm0, rss_kib(s.proc.pid, "VmHWM"))
        st, _, data = s.raw("POST", "/v1/chat/completions", {"messages": user("hello " * 600), "max_tokens": 2})
        err = json.loads(data)["error"]
        assert st == 400 and re.fullmatch(r"Prompt has \d+ tokens, .*", err["message"]), err
        st, _, data = s.raw("POST", "/v1/chat/completions", {"messages": user("hello"), "max_tokens": 2})
        assert st == 200, data
        assert s.alive()


# ---- 4. a busy port ----------------------------------------------------------------

def test_server_second_server_on_busy_port_exits_address_in_use():
    """A second server on the first one's port exits at once with "address in
    use" (no port sharing), before loading the model, and every connection
    keeps reaching the first server."""
    from test_server import demo_model, prog
    binary = os.environ.get("DS4_TEST_SERVER_BIN") or prog("ds4-server")
    with Server() as a:
        t0 = time.time()
        b = subprocess.run([binary, "-m", demo_model(), "--cpu", "--port", str(a.port)],
                           capture_output=True, text=True, timeout=60)
        assert b.returncode == 1, b.stderr
        assert "127.0.0.1:%d: address in use" % a.port in b.stderr, b.stderr
        assert "backend" not in b.stderr  # refused before the model was loaded
        assert time.time() - t0 < 10
        for _ in range(20):
            st, _, _ = a.raw("GET", "/v1/models")
            assert st == 200
        assert a.alive()


# ---- command line: the measurements of issue 14 ----------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["sigterm", "slowloris", "uploads"])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--load", type=int, default=4, help="busy processes during sigterm rounds")
    ap.add_argument("--queued", type=int, default=6)
    a = ap.parse_args()
    if a.what == "sigterm":
        load = cpu_load(a.load)
        try:
            ok_streams = ok_503 = bad_exit = 0
            for r in range(a.rounds):
                complete, n503, rc, detail = sigterm_round(n_queued=a.queued)
                ok_streams += complete
                ok_503 += n503
                bad_exit += rc != 0
                print("round %d: stream %s, 503 %d/%d, exit %s" %
                      (r, "complete" if complete else "LOST FINAL", n503, a.queued, rc), flush=True)
        finally:
            stop_load(load)
        print("running streams with final event: %d/%d; queued requests answered 503: %d/%d; "
              "non-zero exits: %d" % (ok_streams, a.rounds, ok_503, a.rounds * a.queued, bad_exit))
    elif a.what == "slowloris":
        with Server() as s:
            st0, dt0 = timed_models(s.port)
            print("no attack: GET /v1/models -> %s in %.2f s" % (st0, dt0))
            for src in ("127.0.0.2", "127.0.0.1"):
                st, dt, held = slowloris_served(s, n=520, src=src, interval=3.0, settle=8.0)
                print("520 slow-header connections from %s (server holds %d): GET /v1/models from "
                      "127.0.0.1 -> %s in %.2f s" % (src, held, st, dt))
                time.sleep(4)
    else:
        with Server("--api-key", "sekrit") as s:
            rss0 = rss_kib(s.proc.pid)
            peak = [rss0]
            stop = threading.Event()

            def watch():
                while not stop.is_set():
                    peak[0] = max(peak[0], rss_kib(s.proc.pid))
                    time.sleep(0.05)
            w = threading.Thread(target=watch)
            w.start()
            t0 = time.time()
            sts = keyless_uploads(s.port)
            stop.set()
            w.join()
            print("12 keyless 59 MiB uploads: statuses %s in %.1f s; RSS %.0f MiB before, peak "
                  "%.0f MiB (+%.0f MiB)" % (sts, time.time() - t0, rss0 / 1024, peak[0] / 1024,
                                             (peak[0] - rss0) / 1024))


if __name__ == "__main__":
    main()


def test_queued_requests_whose_clients_left_do_not_fill_the_queue():
    """--queue 2: one stream runs, two queued requests' clients disconnect; a new request is queued (not a 429)
    once the server has seen them go, without waiting for the running generation to end (found by an outside
    client pass: abandoned requests blocked everyone until the running one finished)."""
    s = Server("--queue", "2")
    try:
        body = json.dumps({"messages": user("Write forever"), "max_tokens": 3000, "stream": True,
                           "think": False}).encode()
        run = socket.create_connection(("127.0.0.1", s.port))
        run.sendall(post_bytes(s.port, b"/v1/chat/completions", body))
        got = b""
        run.settimeout(60)
        while got.count(b"data:") < 3:
            got += run.recv(4096)
        qs = []
        for k in range(2):
            q = socket.create_connection(("127.0.0.1", s.port))
            q.sendall(post_bytes(s.port, b"/v1/chat/completions", json.dumps(
                {"messages": user("queued %d" % k), "max_tokens": 5, "think": False}).encode()))
            qs.append(q)
        time.sleep(0.5)
        late = socket.create_connection(("127.0.0.1", s.port))
        late.sendall(post_bytes(s.port, b"/v1/chat/completions", json.dumps(
            {"messages": user("too many"), "max_tokens": 5, "think": False}).encode()))
        assert status_of(read_all(late, 30)) == 429  # the queue is really full
        for q in qs:
            q.close()
        time.sleep(1.0)  # the connection threads notice within 200 ms
        again = socket.create_connection(("127.0.0.1", s.port))
        again.sendall(post_bytes(s.port, b"/v1/chat/completions", json.dumps(
            {"messages": user("now"), "max_tokens": 5, "think": False}).encode()))
        again.settimeout(2)
        try:
            head = again.recv(12)  # queued behind the running stream: no status line yet
        except socket.timeout:
            head = b""
        assert not head.startswith(b"HTTP/1.1 429"), head
        run.close()
        r = read_all(again, 60)
        assert status_of(r) == 200, r[:300]
        assert s.wait_log(r"dropped from the queue"), s.log_text()
    finally:
        s.stop()


def test_server_numbers_on_the_command_line_are_plain_decimals():
    """'+2', '0x10', ' 8', '' and '0x1p-2' are not what a user means by a number: usage errors (exit 2)
    naming the option, where strtol/strtod would have read them."""
    from test_server import demo_model, prog
    binary = os.environ.get("DS4_TEST_SERVER_BIN") or prog("ds4-server")
    base = [binary, "-m", demo_model(), "--cpu", "--port", "0"]
    for opt, val in (("--ctx", "+4096"), ("--ctx", "0x1000"), ("--ctx", ""), ("--port", " 8080"),
                     ("--mtp-gate", "0x1p-2"), ("--mtp-gate", "nan")):
        extra = ["--mtp", "synthetic"] if opt == "--mtp-gate" else []
        r = subprocess.run(base + extra + [opt, val], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and opt in r.stderr, (opt, val, r.returncode, r.stderr)


M = "\uff5cDSML\uff5c"


def test_forced_call_schemas_that_loop_or_name_markup():
    """From a fuzz pass: a forced call whose schema cycles through anyOf/oneOf ($defs A = anyOf [$ref A]) recursed
    until the stack overflowed (one request killed the server, every API); property names with markup ('a>b',
    '<think>', the DSML bar, control-token texts) made the forced decoder loop on a token it could not write
    until max_tokens (no call); a tool named 'a&amp;b' came back as 'a&b' (entities are decoded): now the cycle
    ends (a visit budget; and since a forced tool's schema must compile, such a schema is a 400 before any
    decoding), such properties are never offered (the call still comes), and '&' in a tool name is a 400 (OpenAI
    and Anthropic allow only [a-zA-Z0-9_-])."""
    loop = {"type": "object", "$defs": {"A": {"anyOf": [{"$ref": "#/$defs/A"}, {"$ref": "#/$defs/A"}]}},
            "properties": {"x": {"$ref": "#/$defs/A"}}, "required": ["x"]}
    with Server() as s:
        for path, body in [
                ("/v1/chat/completions", {"model": "m", "messages": user("go"), "max_tokens": 60, "think": False,
                                          "tools": [{"type": "function", "function": {"name": "f", "parameters": loop}}],
                                          "tool_choice": "required"}),
                ("/v1/messages", {"model": "m", "messages": user("go"), "max_tokens": 60,
                                  "thinking": {"type": "disabled"}, "tools": [{"name": "f", "input_schema": loop}],
                                  "tool_choice": {"type": "any"}}),
                ("/v1/responses", {"model": "m", "input": "go", "max_output_tokens": 60,
                                   "reasoning": {"effort": "none"},
                                   "tools": [{"type": "function", "name": "f", "parameters": loop}],
                                   "tool_choice": "required"})]:
            st, _, data = s.raw("POST", path, body)
            # no value satisfies the cycle, so no forced call can keep it: a 400 naming the tool (it was a 200
            # with a call the schema cannot hold before forced schemas were checked as response_format's are)
            assert st == 400 and b"tool 'f' cannot be forced" in data, (path, data)
        for key in ("a>b", "<think>", "</think>", "<\uff5cUser\uff5c>", "x\uff5cy", "a&amp;b"):
            schema = {"type": "object", "properties": {key: {"type": "string"}, "ok": {"type": "string"}},
                      "required": [key, "ok"]}
            st, _, data = s.raw("POST", "/v1/chat/completions", {
                "model": "m", "messages": user("go"), "max_tokens": 120, "think": False,
                "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}],
                "tool_choice": {"type": "function", "function": {"name": "f"}}})
            assert st == 200, (key, data)
            msg = json.loads(data)["choices"][0]["message"]
            assert msg["tool_calls"] and "DSML" not in (msg["content"] or ""), (key, msg)
            assert "ok" in json.loads(msg["tool_calls"][0]["function"]["arguments"]), (key, msg)
        st, _, data = s.raw("POST", "/v1/chat/completions", {
            "model": "m", "messages": user("go"), "max_tokens": 5,
            "tools": [{"type": "function", "function": {"name": "a&amp;b", "parameters": {"type": "object"}}}]})
        assert st == 400 and b"tools[0]" in data, data
        assert s.proc.poll() is None


def test_error_bodies_survive_cut_utf8_and_malformed_blocks_are_content():
    """From a fuzz pass: an error message quoting request text cut inside a UTF-8 sequence (a long role of 'é')
    made the error body '{}' on every API; a tool-call block that is closed but breaks the grammar (an invoke
    without a name) was a 500 'unterminated tool call', though TEXT C.6 makes its bytes content (a slightly
    malformed call of a real model would be a 500)."""
    with Server() as s:
        role = "a" + "\u00e9" * 40
        for path in ("/v1/chat/completions", "/v1/messages"):
            st, _, data = s.raw("POST", path, {"model": "m", "max_tokens": 2, "messages": [{"role": role,
                                                                                         "content": "x"}]})
            assert st == 400, data
            err = json.loads(data)["error"]
            assert err["message"] and "\u00e9" in err["message"], err
    reply = ("ok\n\n<{m}tool_calls>\n<{m}invoke>\n<{m}parameter name=\"command\" string=\"true\">ls</{m}parameter>\n"
             "</{m}invoke>\n</{m}tool_calls>").format(m=M)
    tools = [{"type": "function", "function": {"name": "bash", "parameters": {
        "type": "object", "properties": {"command": {"type": "string"}}}}}]
    with Server("--debug-reply", reply) as s:
        body = {"model": "m", "messages": user("go"), "max_tokens": 100, "think": False, "tools": tools}
        st, _, data = s.raw("POST", "/v1/chat/completions", body)
        assert st == 200, data
        ch = json.loads(data)["choices"][0]
        assert not ch["message"].get("tool_calls") and ch["finish_reason"] == "stop", ch
        assert "invoke" in ch["message"]["content"], ch
        st, _, data = s.raw("POST", "/v1/chat/completions", dict(body, stream=True))
        assert st == 200
        text = data.decode()
        assert '"finish_reason":"stop"' in text and "invoke" in text, text[-600:]


def test_server_that_cannot_start_frees_what_it_took():
    """A start that fails after the port is bound (a missing --mtp file) left the listener's state allocated
    (LeakSanitizer, from a fuzz pass); the sanitized build now exits 1 with the message and no leak report."""
    asan = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "build", "asan", "ds4-server")
    if not os.path.exists(asan):
        pytest.skip("build/asan/ds4-server not built")
    from test_server import demo_model
    r = subprocess.run([asan, "-m", demo_model(), "--cpu", "--port", "0", "--mtp", "/nonexistent-ds4.gguf"],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, ASAN_OPTIONS="detect_leaks=1:exitcode=86"))
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "nonexistent-ds4.gguf" in r.stderr and "LeakSanitizer" not in r.stderr, r.stderr[-2000:]
