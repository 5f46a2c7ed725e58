"""Load test for ds4-server: N concurrent streaming clients for T seconds on
the demo model. Every request must end with a finish_reason chunk and
[DONE] (nothing lost), the server must stay up, and its resident memory
must stay flat (RSS after the run vs after a warm-up).

In `make test` it runs briefly (32 clients, 15 s). By hand:
    .venv/bin/python tests/py/test_server_load.py --clients 32 --seconds 120
prints requests done, errors and RSS before/after.
"""
import argparse
import http.client
import json
import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_server import Server  # noqa: E402


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def one_stream(port, rng, max_tokens):
    """One streaming chat request; returns None on success or an error text."""
    words = ["alpha", "beta", "gamma", "delta", "kv", "cache", "server", "token"]
    msgs = [{"role": "system", "content": "Load test %d." % rng.randrange(4)},
            {"role": "user", "content": " ".join(rng.choice(words) for _ in range(rng.randrange(1, 30)))}]
    body = json.dumps({"model": "deepseek-v4-flash", "messages": msgs, "stream": True,
                       "max_tokens": max_tokens, "think": rng.random() < 0.5,
                       "stream_options": {"include_usage": True}})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        c.request("POST", "/v1/chat/completions", body=body,
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            return "status %d: %s" % (r.status, r.read()[:200])
        finish, done, usage = None, False, None
        for raw in r:
            line = raw.decode("utf-8").rstrip("\r\n")
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                continue
            ev = json.loads(data)
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev.get("choices", []):
                finish = ch.get("finish_reason") or finish
        if not done or finish not in ("stop", "length") or usage is None:
            return "incomplete stream (done=%s finish=%s usage=%s)" % (done, finish, usage)
        if usage["completion_tokens"] > max_tokens:
            return "too many tokens"
        return None
    except Exception as e:  # any client-side failure counts as an error
        return repr(e)
    finally:
        c.close()


def run_load(server, clients=32, seconds=15.0, max_tokens=16):
    """Returns dict(done, errors, error_samples, rss_before_kib, rss_after_kib)."""
    # warm-up so allocator pools and caches exist before the RSS baseline
    for i in range(3):
        err = one_stream(server.port, random.Random(i), max_tokens)
        assert err is None, err
    rss_before = rss_kib(server.proc.pid)
    stop_at = time.time() + seconds
    lock = threading.Lock()
    stats = {"done": 0, "errors": 0, "error_samples": []}

    def client(k):
        rng = random.Random(1000 + k)
        while time.time() < stop_at:
            err = one_stream(server.port, rng, max_tokens)
            with lock:
                stats["done"] += 1
                if err:
                    stats["errors"] += 1
                    if len(stats["error_samples"]) < 5:
                        stats["error_samples"].append(err)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    # RSS every ~10% of the run: growth that plateaus is allocator warm-up,
    # growth that continues is a leak
    series = []
    while any(t.is_alive() for t in threads):
        time.sleep(max(1.0, seconds / 10))
        if server.alive():
            series.append(rss_kib(server.proc.pid))
    for t in threads:
        t.join()
    stats["rss_series_kib"] = series
    stats["rss_before_kib"] = rss_before
    stats["rss_after_kib"] = rss_kib(server.proc.pid)
    stats["alive"] = server.alive()
    return stats


def test_server_load_32_streaming_clients_brief():
    with Server("--queue", "64") as s:
        st = run_load(s, clients=32, seconds=15)
        assert st["alive"]
        assert st["errors"] == 0, st["error_samples"]
        assert st["done"] >= 32
        # flat memory: no growth beyond allocator noise
        assert st["rss_after_kib"] - st["rss_before_kib"] < 64 * 1024, st


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--max-tokens", type=int, default=16)
    a = ap.parse_args()
    with Server("--queue", str(max(64, a.clients * 2))) as s:
        t0 = time.time()
        st = run_load(s, a.clients, a.seconds, a.max_tokens)
        el = time.time() - t0
    print("clients %d, %.0f s: requests done %d, errors %d, RSS before %.1f MiB, after %.1f MiB, "
          "server alive %s, exit %s" % (a.clients, el, st["done"], st["errors"],
                                       st["rss_before_kib"] / 1024, st["rss_after_kib"] / 1024,
                                       st["alive"], s.proc.returncode))
    print("RSS during the run (MiB):", " ".join("%.0f" % (k / 1024) for k in st["rss_series_kib"]))
    for e in st["error_samples"]:
        print("  error:", e)
    return 1 if st["errors"] or not st["alive"] else 0


if __name__ == "__main__":
    sys.exit(main())
