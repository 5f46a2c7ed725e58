"""ds4-server disk KV cache (--kv-disk-dir) on the demo model: a prompt saved
by one server process is restored by the next one instead of being
recomputed, gives the same greedy output as a cold run, and damaged cache
files are rejected, removed and logged, never loaded.
"""
import os
import pathlib
import re
import resource
import subprocess
import time

from test_server import NO_THINK, ROOT, Server

SYSTEM = ("You are the demo assistant of the ds4 test suite. Answer briefly and never "
          "invent facts. ") * 12
KW = dict(model="deepseek-v4-flash", max_tokens=8, temperature=0, extra_body=NO_THINK)


def cache_args(d):
    # small thresholds so the demo prompt (~300 tokens) is worth saving
    return ["--kv-disk-dir", d, "--kv-cache-min-tokens", "32",
            "--kv-cache-boundary-align-tokens", "0", "--kv-cache-boundary-trim-tokens", "4"]


def messages(q):
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]


def kv_files(d):
    return sorted(f for f in os.listdir(d) if re.fullmatch(r"[0-9a-f]{40}\.kv", f))


def test_server_disk_cache_restores_prefix_after_restart(tmp_path):
    d = str(tmp_path / "kv")
    with Server(*cache_args(d)) as s:
        a = s.openai().chat.completions.create(messages=messages("What is ds4?"), **KW)
        assert a.usage.prompt_tokens_details.cached_tokens == 0
        assert s.wait_log(r"kv cache stored tokens=\d+ reason=cold")
    # the clean shutdown saved the live session too
    assert re.search(r"kv cache stored tokens=\d+ reason=shutdown", s.log_text())
    assert len(kv_files(d)) >= 1
    with Server(*cache_args(d)) as s:
        b = s.openai().chat.completions.create(messages=messages("What is ds4?"), **KW)
        log = s.log_text()
    assert re.search(r"kv cache hit (?:text|tokens) tokens=\d+", log), log
    assert "kv reuse disk" in log
    # restored, not recomputed: most of the prompt is reported as cached
    assert b.usage.prompt_tokens_details.cached_tokens >= b.usage.prompt_tokens // 2
    assert b.choices[0].message.content == a.choices[0].message.content
    assert b.usage.completion_tokens == a.usage.completion_tokens


def test_server_disk_cache_rejects_corrupt_and_truncated_files(tmp_path):
    d = str(tmp_path / "kv")
    with Server(*cache_args(d)) as s:
        a = s.openai().chat.completions.create(messages=messages("Hello"), **KW)
    log = s.log_text()
    cold = re.search(r"reason=cold file=([0-9a-f]{40}\.kv)", log).group(1)
    down = re.search(r"reason=shutdown file=([0-9a-f]{40}\.kv)", log).group(1)
    assert cold != down and set(kv_files(d)) == {cold, down}
    # the shutdown checkpoint is truncated (caught when the store opens), the
    # cold one, whose key matches the next prompt, gets one flipped payload
    # byte (caught by its digest when it is loaded)
    p = os.path.join(d, down)
    os.truncate(p, os.path.getsize(p) // 2)
    p = os.path.join(d, cold)
    size = os.path.getsize(p)
    with open(p, "r+b") as fh:
        fh.seek(size * 3 // 4)
        byte = fh.read(1)
        fh.seek(size * 3 // 4)
        fh.write(bytes([byte[0] ^ 0x5A]))
    damaged = {f: open(os.path.join(d, f), "rb").read() for f in (cold, down)}
    with Server(*cache_args(d)) as s:
        b = s.openai().chat.completions.create(messages=messages("Hello"), **KW)
        log = s.log_text()
        assert s.alive()
    assert "kv cache hit" not in log
    assert b.usage.prompt_tokens_details.cached_tokens == 0
    assert b.choices[0].message.content == a.choices[0].message.content
    for f in (cold, down):
        assert re.search(r"kv cache: .*removed.*" + f[:40], log), "no log line names " + f
        # the damaged bytes are gone (the server may have stored a fresh,
        # valid checkpoint under the same name since)
        p = os.path.join(d, f)
        assert not os.path.exists(p) or open(p, "rb").read() != damaged[f], f + " was kept"


def test_server_disk_cache_tool_loop_after_restart_restores_exact_dsml(tmp_path):
    from test_server import BASH_TOOL
    d = str(tmp_path / "kv")
    kw = dict(model="m", tools=[BASH_TOOL], temperature=0, extra_body=NO_THINK)
    msgs = messages("List the files")
    with Server(*cache_args(d)) as s:
        a = s.openai().chat.completions.create(messages=msgs, tool_choice="required",
                                               max_tokens=80, **kw)
    call = a.choices[0].message.tool_calls[0]
    msgs = msgs + [
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": call.id, "type": "function",
                         "function": {"name": "bash", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "a.txt\n"}]
    with Server(*cache_args(d)) as s:
        b = s.openai().chat.completions.create(messages=msgs, max_tokens=2, **kw)
        log = s.log_text()
    assert "tool memory: restored 1 of 1 ids from disk" in log, log
    assert re.search(r"kv cache hit (?:text|tokens) tokens=\d+", log), log
    live = a.usage.prompt_tokens + a.usage.completion_tokens
    assert b.usage.prompt_tokens_details.cached_tokens >= live - 1, (b.usage, live)


def test_server_count_tokens_after_restart_renders_the_restored_exact_dsml(tmp_path):
    """count_tokens rendered a replayed tool_use from the in-memory tool map only: after a restart it counted the
    canonical rendering while the request itself loads the exact block from the disk cache. It now restores the
    ids the request names first, as a request does, and counts what the request will prefill."""
    from test_server import ANTH_BASH, NO_THINK_ANTH, tool_result, user
    d = str(tmp_path / "kv")
    kw = dict(model="m", tools=[ANTH_BASH], **NO_THINK_ANTH)
    with Server(*cache_args(d)) as s:
        a = s.anthropic().messages.create(messages=user("List the files " * 8), max_tokens=80,
                                          tool_choice={"type": "any"}, **kw)
    assert a.stop_reason == "tool_use", a
    use = [b for b in a.content if b.type == "tool_use"][0]
    msgs = user("List the files " * 8) + [{"role": "assistant", "content": [b.to_dict() for b in a.content]},
                                           tool_result(use.id, "a.txt")]
    with Server(*cache_args(d)) as s:
        c = s.anthropic()
        n = c.messages.count_tokens(model="m", messages=msgs, tools=[ANTH_BASH], thinking={"type": "disabled"})
        log = s.log_text()
        assert "tool memory: restored 1 of 1 ids from disk" in log, log
        b = c.messages.create(messages=msgs, max_tokens=2, **kw)
    assert n.input_tokens == b.usage.input_tokens + b.usage.cache_read_input_tokens, (n, b.usage)


def test_server_disk_cache_continued_saves_during_prefill_and_decode(tmp_path):
    d = str(tmp_path / "kv")
    args = ["--kv-disk-dir", d, "--kv-cache-min-tokens", "32", "--kv-cache-cold-max-tokens", "0",
            "--kv-cache-continued-interval-tokens", "128", "--kv-cache-boundary-align-tokens", "0"]
    with Server(*args) as s:
        r = s.openai().chat.completions.create(messages=messages("x " * 150), model="m",
                                               max_tokens=130, temperature=0, extra_body=NO_THINK)
        n_prompt = r.usage.prompt_tokens
        log = s.log_text()
    saved = sorted(int(m) for m in re.findall(r"kv cache stored tokens=(\d+) reason=continued", log))
    # every multiple of 128 the session passed, once, during prefill and decode
    want = list(range(128, n_prompt + r.usage.completion_tokens + 1, 128))
    assert saved == want, (saved, n_prompt)
    assert any(t <= n_prompt for t in saved) and any(t > n_prompt for t in saved)
    assert "reason=cold" not in log


def test_server_disk_cache_continued_saves_after_a_cold_save(tmp_path):
    """A cold save syncs to the anchor first (not a multiple of the interval); the prefill after it still ends
    its batches at absolute multiples of the batch size, so the continued saves at every multiple of the
    interval still happen (they were all skipped: the batches counted from the anchor)."""
    d = str(tmp_path / "kv")
    args = ["--kv-disk-dir", d, "--kv-cache-min-tokens", "32", "--kv-cache-continued-interval-tokens", "128",
            "--kv-cache-boundary-align-tokens", "0"]
    with Server(*args) as s:
        r = s.openai().chat.completions.create(messages=messages("x " * 700), model="m", max_tokens=2,
                                               temperature=0, extra_body=NO_THINK)
        n_prompt = r.usage.prompt_tokens
        log = s.log_text()
    cold = [int(m) for m in re.findall(r"kv cache stored tokens=(\d+) reason=cold", log)]
    assert len(cold) == 1 and cold[0] % 128, log
    saved = sorted(int(m) for m in re.findall(r"kv cache stored tokens=(\d+) reason=continued", log))
    assert saved == list(range(128, n_prompt + 1, 128)), (saved, cold, n_prompt)


def test_server_client_gone_during_prefill_keeps_the_cached_conversation(tmp_path):
    """A streaming client that hangs up during a long prefill cancels it, but the conversation already cached
    (and the part of the new prompt evaluated before the cancel) stays: the retry reuses it (it was all dropped,
    so any client could wipe the cache, and one that retries with a short timeout never got past the prefill)."""
    import json
    import socket
    with Server("--ctx", "16384") as s:
        first = messages("tell me about " + "the system " * 300)
        a = s.openai().chat.completions.create(messages=first, **KW)
        n1 = a.usage.prompt_tokens
        second = first + [{"role": "assistant", "content": a.choices[0].message.content},
                          {"role": "user", "content": "and now " + "more words " * 2500}]
        body = json.dumps(dict(model="m", messages=second, max_tokens=4, temperature=0, stream=True,
                               **NO_THINK))
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=120)
        sock.sendall(("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      "Content-Length: %d\r\n\r\n" % len(body.encode())).encode() + body.encode())
        head = b""
        while b"\r\n\r\n" not in head:  # the headers come with the first prefill progress
            k = sock.recv(4096)
            assert k, head
            head += k
        assert head.startswith(b"HTTP/1.1 200"), head
        sock.close()
        assert s.wait_log(r"client went away during prefill", timeout=120)
        b = s.openai().chat.completions.create(messages=second, **KW)
        assert b.usage.prompt_tokens_details.cached_tokens >= n1, (b.usage, s.log_text()[-2000:])
        assert s.alive()


def test_server_disk_cache_moves_between_a_layer_split_and_one_backend(tmp_path):
    """The saved state is laid out per layer whatever the split: a prefix stored by a server whose blocks run
    in two parts (--cpu --split 2,4) is restored by one without a split, and the other way round, with the
    greedy reply of a cold run."""
    cold = Server().__enter__()
    try:
        ref = cold.openai().chat.completions.create(messages=messages("What is ds4?"), **KW)
    finally:
        cold.__exit__(None, None, None)
    for first, second in ((("--split", "2,4"), ()), ((), ("--split", "3,3"))):
        d = str(tmp_path / f"kv{len(first)}")
        with Server(*cache_args(d), *first) as s:
            s.openai().chat.completions.create(messages=messages("What is ds4?"), **KW)
            assert s.wait_log(r"kv cache stored tokens=\d+ reason=cold")
        with Server(*cache_args(d), *second) as s:
            b = s.openai().chat.completions.create(messages=messages("What is ds4?"), **KW)
            log = s.log_text()
        assert "kv reuse disk" in log, log
        assert b.usage.prompt_tokens_details.cached_tokens >= b.usage.prompt_tokens // 2
        assert b.choices[0].message.content == ref.choices[0].message.content, (first, second)


def test_server_disk_cache_not_used_by_a_model_with_other_weights(tmp_path):
    # the same recipe and metadata with other weights (a re-conversion, a
    # fine-tune): the header and tensor table are identical, the checkpoints
    # of one must not be restored by the other
    other = tmp_path / "demo-seed7.gguf"
    subprocess.run([str(ROOT / "ds4-convert"), "--demo", "-o", str(other), "--seed", "7", "--tokenizer",
                    str(ROOT / "tests/data/deepseek-v3-tokenizer.json")], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    d = str(tmp_path / "kv")
    with Server(*cache_args(d)) as s:
        s.openai().chat.completions.create(messages=messages("What is ds4?"), **KW)
        assert s.wait_log(r"kv cache stored tokens=\d+ reason=cold")
    assert kv_files(d)
    with Server(*cache_args(str(tmp_path / "cold")), model=other) as s:
        cold = s.openai().chat.completions.create(messages=messages("What is ds4?"), **KW)
    with Server(*cache_args(d), model=other) as s:
        b = s.openai().chat.completions.create(messages=messages("What is ds4?"), **KW)
        log = s.log_text()
    assert "kv cache hit" not in log and "kv reuse disk" not in log, log
    assert b.usage.prompt_tokens_details.cached_tokens == 0
    assert b.choices[0].message.content == cold.choices[0].message.content
    # the first model's files stay (not ours to evict) and are said to, with their size: the budget does not
    # count them, which went unnoticed (N models used up to N budgets)
    assert re.search(r"kvstore: \d+ files? \([0-9.]+ MiB\) of other models in .*not counted against the budget",
                     log), log


def test_server_disk_cache_directory_is_one_servers(tmp_path):
    # two servers on one directory would each evict the other's files and
    # overrun the budget: the second runs without the disk cache and says why
    d = str(tmp_path / "kv")
    with Server(*cache_args(d)) as a:
        with Server(*cache_args(d)) as b:
            assert b.wait_log(r"kv cache: disabled: .*in use by another process")
            r = b.openai().chat.completions.create(messages=messages("Hello"), **KW)
            assert r.choices[0].finish_reason == "length"
        assert a.wait_log(r"kv cache: " + re.escape(d) + r" \(")
    # the lock goes with the server that held it
    with Server(*cache_args(d)) as c:
        assert c.wait_log(r"kv cache: " + re.escape(d) + r" \(")
        assert "disabled" not in c.log_text()


def test_server_survives_a_file_size_limit(tmp_path):
    # ulimit -f: the checkpoint write fails with EFBIG (reported), the server
    # is not killed by SIGXFSZ and the request is answered
    d = str(tmp_path / "kv")
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (200 * 1024, 200 * 1024))
    with Server(*cache_args(d), preexec_fn=limit) as s:
        r = s.openai().chat.completions.create(messages=messages("What is ds4?"), **KW)
        assert r.usage.completion_tokens > 0
        assert s.wait_log(r"kv cache: .*(File too large|too large)")
        assert s.alive()
        r2 = s.openai().chat.completions.create(messages=messages("Hello again"), **KW)
        assert r2.usage.completion_tokens > 0
    assert not kv_files(d)


def test_server_disk_cache_same_answer_after_restart_when_the_cut_splits_a_merge(tmp_path):
    """Without a chat anchor the cold save cuts at any token; restoring it by its text and tokenizing the rest
    from that byte can merge differently from the whole prompt's tokenization (here 120 tokens instead of 121)
    and change a greedy answer. An entry whose tokens are a prefix of the request's own tokens is now preferred,
    so the restored run sees exactly the cold run's tokens."""
    q = "Please read the following notes carefully and summarise them. " * 10 + "a\n中\t'?a"
    msg = [{"role": "user", "content": q}]
    with Server() as s:
        ref = s.openai().chat.completions.create(messages=msg, **KW)
    d = str(tmp_path / "kv")
    with Server(*cache_args(d)) as s:
        s.openai().chat.completions.create(messages=msg, **KW)
    with Server(*cache_args(d)) as s:
        b = s.openai().chat.completions.create(messages=msg, **KW)
        log = s.log_text()
    assert "kv reuse disk" in log, log
    assert b.usage.prompt_tokens == ref.usage.prompt_tokens
    assert b.choices[0].message.content == ref.choices[0].message.content


def test_server_disk_cache_files_are_the_owners_only(tmp_path):
    """The cache holds prompts in the clear (key text): the directory is created 0700 and files are 0600."""
    import stat
    d = str(tmp_path / "kv")
    with Server(*cache_args(d)) as s:
        s.openai().chat.completions.create(messages=messages("my password is hunter2"), **KW)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    files = os.listdir(d)
    assert kv_files(d)
    for f in files:
        assert stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode) & 0o077 == 0, (f, oct(os.stat(os.path.join(d, f)).st_mode))


def test_server_disk_cache_writes_again_what_was_deleted_behind_its_back(tmp_path):
    """Files deleted while the server runs are written again by the next save of the same state (the index
    alone said they were there, so the shutdown checkpoint was silently skipped)."""
    d = str(tmp_path / "kv")
    with Server(*cache_args(d)) as s:
        s.openai().chat.completions.create(messages=messages("What is ds4?"), **KW)
        s.openai().chat.completions.create(messages=messages("Hello"), **KW)
        for f in kv_files(d):
            os.unlink(os.path.join(d, f))
        s.openai().chat.completions.create(messages=messages("What is ds4?"), **KW)
    assert re.search(r"kv cache stored tokens=\d+ reason=shutdown", s.log_text()), s.log_text()
    assert kv_files(d)


def test_server_disk_budget_option_cannot_wrap(tmp_path):
    """--kv-disk-space-mb takes up to 2^40 MiB; a larger value is a usage error (it wrapped to a 1 MiB budget)."""
    from test_server import demo_model, prog
    r = subprocess.run([prog("ds4-server"), "-m", demo_model(), "--cpu", "--port", "0", "--kv-disk-dir",
                        str(tmp_path / "kv"), "--kv-disk-space-mb", "17592186044417"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--kv-disk-space-mb" in r.stderr, r.stderr


def test_server_cold_save_still_happens_when_the_first_try_hung_up(tmp_path):
    """A client that hangs up during a cold request's first prefill (before its cold save) leaves that part of
    the prompt live; the retry continues it from there and still writes the cold entry (a shared system prompt
    must reach the disk cache)."""
    import json
    import socket
    d = str(tmp_path / "kv")
    system = "You are a very careful assistant. " * 1500  # a long anchor: the cold sync takes many batches
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]
    with Server("--ctx", "16384", *cache_args(d)) as s:
        body = json.dumps(dict(model="m", messages=msgs, max_tokens=4, temperature=0, stream=True, **NO_THINK))
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=120)
        sock.sendall(("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      "Content-Length: %d\r\n\r\n" % len(body.encode())).encode() + body.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            k = sock.recv(4096)
            assert k, head
            head += k
        sock.close()
        assert s.wait_log(r"client went away during prefill", timeout=120)
        b = s.openai().chat.completions.create(messages=msgs, **KW)
        log = s.log_text()
    assert "reason=cold" in log, log[-3000:]
    assert b.usage.prompt_tokens_details.cached_tokens > 0, b.usage


def test_server_disk_cache_rewrites_an_entry_written_at_a_larger_ctx(tmp_path):
    """An entry written at a larger --ctx is passed over by a server with a smaller one (it may not fit), and its
    save of the same prefix was skipped as "already stored": after lowering --ctx that prefix was never cached
    again. It is now rewritten at the smaller ctx and reused after the next restart."""
    d = str(tmp_path / "kv")
    with Server(*cache_args(d), ctx=8192) as s:
        a = s.openai().chat.completions.create(messages=messages("What is ds4?"), **KW)
        assert s.wait_log(r"kv cache stored tokens=\d+ reason=cold")
    for _ in range(2):
        with Server(*cache_args(d), ctx=2048) as s:
            b = s.openai().chat.completions.create(messages=messages("What is ds4?"), **KW)
            log = s.log_text()
    assert b.usage.prompt_tokens_details.cached_tokens > 0, log  # the second run at 2048 reused its own save
    assert b.choices[0].message.content == a.choices[0].message.content


def test_server_disk_cache_removes_a_dead_writers_temp_file_even_if_its_pid_lives(tmp_path):
    """A temp file left by a killed writer ("<name>.kv.tmp.<pid>.<n>") stayed forever when another process had
    taken that pid (routine in containers). Holding the directory's lock, the store removes one not written for
    10 minutes whatever its pid (a fresh one of a live pid stays: tests/unit/test_kvstore.c)."""
    d = tmp_path / "kv"
    d.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        leftover = d / ("ab" * 20 + ".kv.tmp.%d.0" % sleeper.pid)
        leftover.write_bytes(b"x" * 4096)
        hour_ago = time.time() - 3600
        os.utime(leftover, (hour_ago, hour_ago))
        with Server(*cache_args(str(d))) as s:
            assert s.wait_log(r"removed leftover temp file")
        assert not leftover.exists()
    finally:
        sleeper.kill()


def _server_on_small_tmpfs(tmp_path, monkeypatch, before=""):
    """tmp_path/fs, on which the servers of the test (DS4_TEST_SERVER_BIN, a wrapper) see a 2 MiB tmpfs of their
    own mount namespace (a demo checkpoint is ~0.86 MB); `before` is shell run there first."""
    import stat
    from oracle_util import small_tmpfs_dir
    fs = small_tmpfs_dir(tmp_path)
    wrap = tmp_path / "server.sh"
    wrap.write_text("#!/bin/bash\nexec unshare -rm bash -c 'mount -t tmpfs -o size=2048k tmpfs \"$0\" || exit 99; "
                    "%sexec \"$@\"' %s %s \"$@\"\n" % (before, fs, ROOT / "ds4-server"))
    wrap.chmod(wrap.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("DS4_TEST_SERVER_BIN", str(wrap))
    return fs


def _ask_system(s, q):
    """A short chat under a system prompt of its own (q names it): a cold save of ~230 tokens each."""
    sysmsg = ("You are the demo assistant of the ds4 test suite %s. " % q) * 12
    return s.openai().chat.completions.create(
        messages=[{"role": "system", "content": sysmsg}, {"role": "user", "content": "hi " + q}], **KW)


def test_server_disk_cache_makes_room_on_a_full_disk(tmp_path, monkeypatch):
    """A full disk (a 2 MiB tmpfs; a demo checkpoint is ~0.86 MB) made every later save fail with nothing stored
    ever again, the old entries kept however little they were worth. The store now evicts its own lowest-score
    entries to make room, once, and the new checkpoint is stored."""
    fs = _server_on_small_tmpfs(tmp_path, monkeypatch)
    with Server(*cache_args(str(fs))) as s:
        for q in "abcd":
            _ask_system(s, q)
        log = s.log_text()
    assert "to make room on a full disk" in log, log
    last_evict = log.rindex("to make room on a full disk")
    assert re.search(r"kv cache stored tokens=\d+ reason=cold", log[last_evict:]), log[last_evict:]


def test_server_full_disk_filled_by_another_file_keeps_the_entries(tmp_path, monkeypatch):
    """A disk filled by something else: evicting this store's entries could not make room, yet the store
    deleted its best entries on every save and still stored nothing (the cache emptied itself). It now evicts
    only when its own files can free what is missing, so the entry stays and still serves."""
    trigger = tmp_path / "fill-now"
    # the tmpfs lives in the server's mount namespace: a watcher there fills it when the test asks
    fs = _server_on_small_tmpfs(tmp_path, monkeypatch,
                                "(while [ ! -e %s ]; do sleep 0.05; done; dd if=/dev/zero of=\"$0/filler\" bs=4k "
                                "2>/dev/null; touch %s.done) & " % (trigger, trigger))
    ask = _ask_system
    with Server(*cache_args(str(fs))) as s:
        first = ask(s, "a").choices[0].message.content
        assert re.search(r"kv cache stored tokens=\d+ reason=cold", s.log_text()), s.log_text()
        trigger.write_text("")
        done = pathlib.Path(str(trigger) + ".done")
        t0 = time.time()
        while not done.exists() and time.time() - t0 < 30:
            time.sleep(0.05)
        assert done.exists()
        mark = len(s.log_text())
        ask(s, "b")  # its save finds the disk full
        again = ask(s, "a")  # a live miss: served from the entry that must still be there
        log = s.log_text()[mark:]
    assert "to make room on a full disk" not in log, log
    assert "nothing evicted" in log, log
    assert re.search(r"kv cache hit tokens tokens=\d+", log), log
    assert again.choices[0].message.content == first


def test_server_continued_saves_with_mtp_cycles_stepping_over_the_multiples(tmp_path):
    """A continued save was taken only when a cycle ended exactly on a multiple of the interval; an MTP cycle
    advances 2-4 tokens and stepped over most of them (a long generation kept about one save in four). Now one
    save at the first cycle end at or past each multiple, and none in between."""
    from test_mtp import make_mtp
    from test_server import demo_model
    mtp = make_mtp(demo_model(), tmp_path / "mtp.gguf", seed=3, arch="deepseek4_mtp_support")
    d = str(tmp_path / "kv")
    step = 32
    args = ["--kv-disk-dir", d, "--kv-cache-min-tokens", "32", "--kv-cache-cold-max-tokens", "0",
            "--kv-cache-continued-interval-tokens", str(step), "--kv-cache-boundary-align-tokens", "0",
            "--mtp", mtp, "--mtp-gate", "0", "--debug-mtp-accept", "0.9"]
    with Server(*args) as s:
        r = s.openai().chat.completions.create(messages=messages("Tell me a long story"), model="m",
                                               max_tokens=300, temperature=0, extra_body=NO_THINK)
        log = s.log_text()
    n_prompt, n_gen = r.usage.prompt_tokens, r.usage.completion_tokens
    assert n_gen >= 8 * step, n_gen
    saved = sorted(int(m) for m in re.findall(r"kv cache stored tokens=(\d+) reason=continued", log))
    # never two saves between two multiples (prefill batches may step over several: one save then)
    got = [t // step for t in saved]
    assert got == sorted(set(got)), saved
    # in the generation every multiple passed has its save within the cycle that passed it (at most 4 tokens)
    for m in range(step, n_prompt + n_gen - 3, step):
        if m > n_prompt:
            assert any(m <= t <= m + 3 for t in saved), (m, saved, n_prompt)
    assert sum(t % step != 0 for t in saved if t > n_prompt) > 0, saved  # cycles did step over multiples


def _rewrite_kv_payload(path, edit):
    """Rewrites a cache file (kvstore.c layout) with its session payload edited by edit(bytes) -> bytes; the
    payload's own SHA-256 (its last 32 bytes) and the file's digests are made valid again, so only the engine's
    payload checks can refuse it. Returns the new file's path (the name follows the content)."""
    import hashlib
    import struct
    b = open(path, "rb").read()
    n, _, _, klen = struct.unpack_from("<IIII", b, 8)
    pb, tb = struct.unpack_from("<QQ", b, 40)
    o = 184
    tok = b[o:o + 4 * n]
    key = b[o + 4 * n:o + 4 * n + klen]
    o += 4 * n + klen
    pl = bytearray(edit(bytes(b[o:o + pb])))
    tr = b[o + pb:o + pb + tb]
    pl[-32:] = hashlib.sha256(bytes(pl[:-32])).digest()
    raw = bytearray(b[:184])
    struct.pack_into("<Q", raw, 40, len(pl))
    raw[88:120] = hashlib.sha256(bytes(pl)).digest()
    m = bytearray(raw[:152])
    m[12:16] = b"\0" * 4
    m[32:40] = b"\0" * 8
    raw[152:184] = hashlib.sha256(bytes(m) + tok + key).digest()
    os.unlink(path)
    name = hashlib.sha256(bytes(raw[56:88]) + struct.pack("<I", n) + tok + key).hexdigest()[:40] + ".kv"
    out = os.path.join(os.path.dirname(path), name)
    open(out, "wb").write(bytes(raw) + tok + key + bytes(pl) + tr)
    return out


def test_server_entry_whose_payload_is_refused_is_removed_and_the_next_serves(tmp_path):
    """A file that passes the store's checks but whose payload the engine refuses (here: written with other
    numerics) was kept: refused on every request, it hid the shorter entries behind it, and its name being
    taken, that prefix was never stored again. It is now removed and the next best entry serves the request."""
    d = str(tmp_path / "kv")
    q = messages("What is ds4?")
    with Server(*cache_args(d)) as s:
        first = s.openai().chat.completions.create(messages=q, **KW).choices[0].message.content
    log = s.log_text()  # with the shutdown save
    stored = {m.group(2): int(m.group(1)) for m in re.finditer(r"kv cache stored tokens=(\d+) reason=\w+ file=(\S+)", log)}
    assert len(stored) >= 2, log  # the cold prefix and the shutdown save of the whole turn
    longest = max(stored, key=stored.get)
    bad = _rewrite_kv_payload(os.path.join(d, longest), lambda p: p[:12] + (15).to_bytes(4, "little") + p[16:])
    # the next turn: the whole first turn (the shutdown save, by its text) is the best entry, then the prefix
    q2 = q + [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    with Server() as s:
        want = s.openai().chat.completions.create(messages=q2, **KW).choices[0].message.content
    with Server(*cache_args(d)) as s:
        got = s.openai().chat.completions.create(messages=q2, **KW).choices[0].message.content
        log = s.log_text()
    assert re.search(r"payload of %s rejected: .*numerics.*; removed" % os.path.basename(bad), log), log
    assert re.search(r"kv cache hit tokens tokens=%d " % min(stored.values()), log), log
    assert not os.path.exists(bad)
    assert got == want


def test_server_boundary_trim_at_its_largest_does_not_overflow(tmp_path, monkeypatch):
    """--kv-cache-boundary-trim-tokens accepts up to INT_MAX; the cold save's length added it to the minimum in
    int (signed overflow: the sanitized server stopped, the request failed). Now compared in 64 bits: the cold
    save takes the whole prompt, as for any trim longer than the prompt."""
    asan = ROOT / "build" / "asan" / "ds4-server"
    if not asan.exists():
        import pytest
        pytest.skip("build/asan/ds4-server not built")
    d = str(tmp_path / "kv")
    monkeypatch.setenv("DS4_TEST_SERVER_BIN", str(asan))
    with Server("--kv-disk-dir", d, "--kv-cache-min-tokens", "32", "--kv-cache-boundary-align-tokens", "0",
                "--kv-cache-boundary-trim-tokens", "2147483647") as s:
        # no user turn in the prompt: the cold save falls back to the trim rule
        r = s.openai().completions.create(model="m", prompt="x " * 200, max_tokens=2, temperature=0)
        log = s.log_text()
    assert r.choices[0].finish_reason == "length"
    assert "runtime error" not in log, log
    assert re.search(r"kv cache stored tokens=\d+ reason=cold", log), log


def test_server_regenerated_reply_rewinds_in_memory_not_from_disk(tmp_path):
    """The same request twice (a client's "regenerate"): the prompt is a shorter prefix of the live session, a
    live miss; the session's own checkpoint at the prompt's end serves it, as without a disk cache. With
    --kv-disk-dir the second request read a checkpoint back from disk (after writing the live session) although
    memory held as much; now the disk entry is not loaded, and the reply is the same (the cold-save path may
    rewind to its aligned prefix a few tokens before the prompt's end)."""
    d = str(tmp_path / "kv")
    replies = {}
    for disk in (False, True):
        with Server(*(cache_args(d) if disk else [])) as s:
            c = s.openai()
            a = c.chat.completions.create(messages=messages("Fix the build"), **KW)
            n0 = len(s.log)
            b = c.chat.completions.create(messages=messages("Fix the build"), **KW)
            log = "\n".join(s.log[n0:])
        assert b.choices[0].message.content == a.choices[0].message.content
        assert b.usage.prompt_tokens_details.cached_tokens >= b.usage.prompt_tokens - 8, (disk, b.usage, log)
        assert "kv reuse disk" not in log and "kv cache hit" not in log, log
        replies[disk] = b.choices[0].message.content
    assert replies[True] == replies[False]
