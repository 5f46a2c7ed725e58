"""ds4-server end to end, with the official openai and anthropic SDKs as real
clients, on the demo model (random weights, real DeepSeek tokenizer: its
text is meaningless; these tests check protocol shapes, KV reuse and error
handling, never the quality of the text).

Each test starts its own server on a free loopback port (--port 0, the
server logs the port it bound) and stops it. Clients are created with
_strict_response_validation=True so every response and stream event is
validated against the SDK's own types.
"""
import fcntl
import http.client
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import termios
import threading
import time

import pytest

from conftest import ROOT, prog

DEMO = ROOT / "build" / "demo.gguf"
NO_THINK = {"think": False}
T0 = {"temperature": 0}  # the anthropic SDK's create() no longer takes temperature


def demo_model():
    """Path of the demo model, building it once with `make demo-model`."""
    if not DEMO.exists():
        subprocess.run(["make", "-s", "demo-model"], cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    if not DEMO.exists() and (ROOT / "ds4-convert").exists():
        subprocess.run([str(ROOT / "ds4-convert"), "--demo", "-o", str(DEMO), "--tokenizer",
                        str(ROOT / "tests/data/deepseek-v3-tokenizer.json")], cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not DEMO.exists():
        pytest.skip("demo model not available (make demo-model failed)")
    return str(DEMO)


class Server:
    """A ds4-server child process on 127.0.0.1:<free port>; its stderr log is
    collected line by line in self.log. log_text() holds every line the server
    wrote before it was called (a line logged just before a reply is there
    when the reply is)."""

    def __init__(self, *args, ctx=4096, wait=120, model=None, preexec_fn=None):
        self.log = []
        self.eof = False
        self.cond = threading.Condition()
        self.port = None
        # DS4_TEST_SERVER_BIN runs the suite against another build (e.g. one
        # with AddressSanitizer)
        binary = os.environ.get("DS4_TEST_SERVER_BIN") or prog("ds4-server")
        cmd = [binary, "-m", model or demo_model(), "--cpu", "--port", "0",
               "--ctx", str(ctx)] + [str(a) for a in args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, preexec_fn=preexec_fn)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        deadline = time.time() + wait
        with self.cond:
            while self.port is None and self.proc.poll() is None and time.time() < deadline:
                self.cond.wait(0.2)
        if self.port is None:
            self.stop()
            raise RuntimeError("ds4-server did not start:\n" + "\n".join(self.log[-30:]))
        self.url = "http://127.0.0.1:%d" % self.port

    def _read(self):
        # each chunk is read from the pipe and its lines appended under the
        # lock, so no byte is ever out of the pipe and not yet in self.log
        # while log_text() holds the lock (see _caught_up)
        fd = self.proc.stderr.fileno()
        part = b""
        while True:
            select.select([fd], [], [])
            with self.cond:
                chunk = os.read(fd, 65536)
                part += chunk
                lines = part.split(b"\n")
                part = lines.pop() if chunk else b""
                for raw in lines + ([part] if not chunk and part else []):
                    line = raw.decode("utf-8", "replace")
                    self.log.append(line)
                    m = re.search(r"listening on http://[\d.]+:(\d+)", line)
                    if m:
                        self.port = int(m.group(1))
                self.eof = not chunk
                self.cond.notify_all()
                if not chunk:
                    return

    def _caught_up(self, timeout=10):
        """With self.cond held: waits until the reader has taken in every byte
        the server has written so far (the stderr pipe is empty)."""
        deadline = time.time() + timeout
        fd = self.proc.stderr.fileno()
        while not self.eof and time.time() < deadline:
            n = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
            if n == 0:
                return
            self.cond.wait(0.05)

    def log_text(self):
        with self.cond:
            self._caught_up()
            return "\n".join(self.log)

    def wait_log(self, pattern, timeout=30):
        deadline = time.time() + timeout
        with self.cond:
            while time.time() < deadline:
                if re.search(pattern, "\n".join(self.log)):
                    return True
                self.cond.wait(0.2)
        return False

    def stop(self, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(5)
        # a sanitized build (DS4_TEST_SERVER_BIN=build/asan/ds4-server) reports here
        bad = [l for l in self.log if "ERROR: AddressSanitizer" in l or "runtime error:" in l]
        assert not bad, "\n".join(self.log[-40:])
        return self.proc.returncode

    def alive(self):
        return self.proc.poll() is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def openai(self, **kw):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0,
                             timeout=300, _strict_response_validation=True, **kw)

    def anthropic(self):
        import anthropic
        return anthropic.Anthropic(base_url=self.url, api_key="none", max_retries=0,
                                   timeout=300, _strict_response_validation=True)

    def raw(self, method, path, body=None, headers=None, timeout=120):
        """One raw HTTP request; returns (status, headers dict, body bytes)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, dict(r.getheaders()), data


DSML_M = "\uff5cDSML\uff5c"


def dsml_call(name, lead="\n\n", **args):
    """The DSML block of one call with string arguments, as the model writes it. Given to --debug-reply, it plays
    a model that calls the tool: a forced call's rules still decide each token (worker.c), and unlike the random
    demo model it closes its string values itself."""
    ps = "".join('<{m}parameter name="%s" string="true">%s</{m}parameter>\n' % (k, v) for k, v in args.items())
    return (lead + '<{m}tool_calls>\n<{m}invoke name="%s">\n' % name + ps +
            "</{m}invoke>\n</{m}tool_calls>").replace("{m}", DSML_M)


BASH_CALL = dsml_call("bash", command="ls -la /tmp && echo done")
# the same call after a short reasoning (thinking on)
BASH_CALL_THINK = "Listing the files.</think>" + BASH_CALL


BASH_TOOL = {
    "type": "function",
    "function": {
        "name": "bash",
        "description": "Run a shell command",
        "parameters": {"type": "object", "properties": {"command": {"type": "string"}},
                       "required": ["command"]},
    },
}


def user(text):
    return [{"role": "user", "content": text}]


def prompt_tokens(u):
    """All prompt tokens of an Anthropic usage: new input, cache reads, cache writes."""
    return u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens


# ---- OpenAI SDK -----------------------------------------------------------------

def test_server_models_openai_sdk_and_trace_file(tmp_path):
    trace = tmp_path / "trace.txt"
    with Server("--trace", trace) as s:
        c = s.openai()
        models = c.models.list()
        ids = [m.id for m in models.data]
        assert ids == ["deepseek-v4-flash"]
        m = c.models.retrieve("deepseek-v4-flash")
        assert m.id == "deepseek-v4-flash" and m.owned_by == "ds4.c"
        assert m.model_extra["context_length"] == 4096
        c.chat.completions.create(model="x", messages=user("trace me"), max_tokens=2,
                                  extra_body=NO_THINK)
    t = trace.read_text(errors="replace")
    assert '"trace me"' in t  # raw request
    assert "<｜User｜>trace me<｜Assistant｜></think>" in t  # rendered prompt
    assert re.search(r"--- finish=(stop|length) completion_tokens=\d", t)


def test_server_chat_openai_sdk_plain_and_stream_give_same_greedy_text():
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    with Server() as s:
        c = s.openai()
        r = c.chat.completions.create(model="deepseek-v4-flash", messages=user("Hello there"),
                                      max_tokens=12, temperature=0, extra_body=NO_THINK)
        assert isinstance(r, ChatCompletion)
        ChatCompletion.model_validate(r.to_dict())
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.prompt_tokens > 0
        assert r.usage.completion_tokens <= 12
        chunks = list(c.chat.completions.create(
            model="deepseek-v4-flash", messages=user("Hello there"), max_tokens=12, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body=NO_THINK))
        assert all(isinstance(k, ChatCompletionChunk) for k in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(k.choices[0].delta.content or "" for k in chunks if k.choices)
        assert text == r.choices[0].message.content
        finals = [k for k in chunks if k.choices and k.choices[0].finish_reason]
        assert len(finals) == 1 and finals[0].choices[0].finish_reason == r.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
        # reuse of the same prompt depends on the engine's checkpoints (the
        # live session holds prompt + output); the split is consistent
        u = chunks[-1].usage
        assert u.prompt_tokens == r.usage.prompt_tokens
        assert (u.prompt_tokens_details.cached_tokens + u.prompt_tokens_details.cache_write_tokens
                == u.prompt_tokens)


def test_server_chat_forced_tool_call_openai_sdk():
    with Server("--debug-reply", BASH_CALL) as s:
        c = s.openai()
        r = c.chat.completions.create(
            model="deepseek-v4-flash", messages=user("List the files"), tools=[BASH_TOOL],
            tool_choice={"type": "function", "function": {"name": "bash"}}, max_tokens=80,
            temperature=0, extra_body=NO_THINK)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls", msg
        assert len(msg.tool_calls) == 1
        call = msg.tool_calls[0]
        assert call.type == "function" and call.function.name == "bash"
        assert re.fullmatch(r"call_[0-9a-f]{32}", call.id)
        args = json.loads(call.function.arguments)
        assert args == {"command": "ls -la /tmp && echo done"}
    # thinking mode: the reasoning is closed, then the call follows
    with Server("--debug-reply", BASH_CALL_THINK) as s:
        r2 = s.openai().chat.completions.create(model="deepseek-v4-flash", messages=user("List the files"),
                                                tools=[BASH_TOOL], tool_choice="required", max_tokens=400)
        assert r2.choices[0].finish_reason == "tool_calls"
        assert r2.choices[0].message.model_extra.get("reasoning_content") == "Listing the files.", r2
        assert r2.choices[0].message.tool_calls[0].function.name == "bash"
        assert json.loads(r2.choices[0].message.tool_calls[0].function.arguments) == {
            "command": "ls -la /tmp && echo done"}


def test_server_chat_stream_tool_call_deltas_openai_sdk():
    with Server("--debug-reply", BASH_CALL) as s:
        c = s.openai()
        stream = c.chat.completions.create(
            model="deepseek-v4-flash", messages=user("List the files"), tools=[BASH_TOOL],
            tool_choice="required", max_tokens=80, temperature=0, stream=True,
            extra_body=NO_THINK)
        starts, frags, finish = [], [], None
        for k in stream:
            if not k.choices:
                continue
            ch = k.choices[0]
            for tc in ch.delta.tool_calls or []:
                if tc.id:
                    starts.append((tc.index, tc.id, tc.function.name))
                if tc.function and tc.function.arguments:
                    frags.append(tc.function.arguments)
            finish = ch.finish_reason or finish
        assert finish == "tool_calls"
        assert len(starts) == 1 and starts[0][0] == 0 and starts[0][2] == "bash"
        assert len(frags) >= 2, "arguments should arrive in several deltas"
        args = json.loads("".join(frags))
        assert args == {"command": "ls -la /tmp && echo done"}


def test_server_completions_openai_sdk():
    from openai.types import Completion
    with Server() as s:
        c = s.openai()
        r = c.completions.create(model="deepseek-v4-flash", prompt="Once upon a time",
                                 max_tokens=8, temperature=0, extra_body=NO_THINK)
        assert isinstance(r, Completion) and r.object == "text_completion"
        assert 0 < r.usage.prompt_tokens and r.usage.completion_tokens <= 8
        # The SDK's Completion type declares finish_reason non-null, while
        # streamed chunks carry null until the last one (as OpenAI's own API
        # does), so the stream is read with a non-strict client.
        import openai
        loose = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        parts = list(loose.completions.create(model="deepseek-v4-flash", prompt="Once upon a time",
                                          max_tokens=8, temperature=0, stream=True,
                                          extra_body=NO_THINK))
        assert all(isinstance(p, Completion) for p in parts)
        assert "".join(p.choices[0].text for p in parts if p.choices) == r.choices[0].text
        assert parts[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_server_responses_stream_events_openai_sdk():
    from openai.types.responses import Response
    with Server() as s:
        c = s.openai()
        r = c.responses.create(model="deepseek-v4-flash", input="Say hi", max_output_tokens=10,
                               reasoning={"effort": "none"}, temperature=0)
        assert isinstance(r, Response) and r.status in ("completed", "incomplete")
        events = list(c.responses.create(model="deepseek-v4-flash", input="Say hi",
                                          max_output_tokens=10, reasoning={"effort": "none"},
                                          temperature=0, stream=True))
        types = [e.type for e in events]
        assert types[:2] == ["response.created", "response.in_progress"], types[:3]
        assert types[-1] in ("response.completed", "response.incomplete")
        assert [e.sequence_number for e in events] == list(range(len(events)))
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        final = events[-1].response
        assert final.output_text == text == r.output_text
        if text:
            assert "response.output_item.added" in types and "response.output_text.done" in types


def test_server_messages_anthropic_sdk_plain_stream_and_tool_use():
    from anthropic.types import Message
    with Server() as s:
        c = s.anthropic()
        m = c.messages.create(model="deepseek-v4-flash", max_tokens=10, extra_body=T0,
                              messages=user("Hello"), thinking={"type": "disabled"})
        assert isinstance(m, Message) and m.stop_reason in ("end_turn", "max_tokens")
        with c.messages.stream(model="deepseek-v4-flash", max_tokens=10, extra_body=T0,
                               messages=user("Hello"), thinking={"type": "disabled"}) as st:
            final = st.get_final_message()
        assert [b.type for b in final.content] == [b.type for b in m.content]
        assert final.content[0].text == m.content[0].text
        assert prompt_tokens(final.usage) == prompt_tokens(m.usage) > 0
        tool = ANTH_BASH  # (an integer argument the random model closes: a call it ended itself)
        kinds = []
        with c.messages.stream(model="deepseek-v4-flash", max_tokens=80, extra_body=T0,
                               messages=user("List files"), tools=[tool],
                               tool_choice={"type": "tool", "name": "Bash"},
                               thinking={"type": "disabled"}) as st:
            for ev in st:
                if ev.type == "content_block_delta":
                    kinds.append(ev.delta.type)
            final = st.get_final_message()
        assert "input_json_delta" in kinds
        assert final.stop_reason == "tool_use"
        uses = [b for b in final.content if b.type == "tool_use"]
        assert len(uses) == 1 and uses[0].name == "Bash"
        assert re.fullmatch(r"toolu_[0-9a-f]{32}", uses[0].id)
        assert isinstance(uses[0].input["lines"], int)


# ---- KV reuse -----------------------------------------------------------------------

def test_server_prefix_reuse_reports_cached_tokens_and_same_greedy_tokens():
    first = [{"role": "system", "content": "You are a test system prompt. " * 8},
             {"role": "user", "content": "First question about the weather"}]
    kw = dict(model="deepseek-v4-flash", max_tokens=10, temperature=0, extra_body=NO_THINK)
    with Server() as s:
        c = s.openai()
        a = c.chat.completions.create(messages=first, **kw)
        second = first + [{"role": "assistant", "content": a.choices[0].message.content},
                          {"role": "user", "content": "And tomorrow?"}]
        b = c.chat.completions.create(messages=second, **kw)
        cached = b.usage.prompt_tokens_details.cached_tokens
        assert cached >= a.usage.prompt_tokens - 2, (cached, a.usage.prompt_tokens)
        assert b.usage.prompt_tokens_details.cache_write_tokens == b.usage.prompt_tokens - cached
    with Server() as s:  # cold
        cold = s.openai().chat.completions.create(messages=second, **kw)
        assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert cold.choices[0].message.content == b.choices[0].message.content
    assert cold.usage.completion_tokens == b.usage.completion_tokens


def test_server_greedy_completion_equals_cli():
    prompt = "The quick brown fox"
    rendered = ("<｜begin▁of▁sentence｜>You are a helpful assistant<｜User｜>" + prompt +
                "<｜Assistant｜></think>")
    with Server() as s:
        r = s.openai().completions.create(model="x", prompt=prompt, max_tokens=10, temperature=0,
                                          extra_body=NO_THINK)
    cli = subprocess.run([prog("ds4"), "-m", demo_model(), "--cpu", "-p", rendered, "-n", "10",
                          "--temp", "0"], cwd=ROOT, capture_output=True, timeout=300)
    assert cli.returncode == 0, cli.stderr.decode(errors="replace")
    m = re.search(r"generated (\d+)", cli.stderr.decode(errors="replace"))
    assert m and int(m.group(1)) == r.usage.completion_tokens
    if "<think>" not in r.choices[0].text and "</think>" not in r.choices[0].text:
        out = cli.stdout.decode("utf-8", errors="replace")
        assert out == r.choices[0].text or out == r.choices[0].text + "\n"


# ---- errors, limits, concurrency ---------------------------------------------------

def err_of(data):
    return json.loads(data)["error"]


def test_server_usage_counts_reasoning_tokens():
    """Responses output_tokens_details.reasoning_tokens and chat completion_tokens_details.reasoning_tokens count
    the generated tokens of the reasoning (up to the one that closes it); 0 without thinking."""
    with Server(ctx=512) as s:
        for think in (True, False):
            st, _, data = s.raw("POST", "/v1/responses", {"input": "Tell me a story", "max_output_tokens": 12,
                                                          "temperature": 0, "reasoning": {"effort": "high" if think else "none"}})
            assert st == 200, data
            r = json.loads(data)
            u = r["usage"]
            n_r = u["output_tokens_details"]["reasoning_tokens"]
            has_msg = any(it["type"] == "message" for it in r["output"])
            if not think:
                assert n_r == 0, u
            elif not has_msg:  # cut inside the reasoning: every token is reasoning
                assert n_r == u["output_tokens"], (u, r["output"])
            else:
                assert 0 < n_r <= u["output_tokens"], u
            st, _, data = s.raw("POST", "/v1/chat/completions", {"messages": user("Tell me a story"), "max_tokens": 12,
                                                                 "temperature": 0, "think": think})
            c = json.loads(data)
            n_c = c["usage"]["completion_tokens_details"]["reasoning_tokens"]
            assert (n_c == 0) if not think else (0 < n_c <= c["usage"]["completion_tokens"]), c["usage"]


def test_server_bad_input_gets_documented_status_and_server_stays_up():
    with Server("--cors", ctx=256) as s:
        cases = [
            ("POST", "/v1/chat/completions", b"{not json", 400, "invalid JSON request: "),  # + jansson's why, where
            ("POST", "/v1/chat/completions", {"messages": user("x"), "stream": "true"}, 400,
             "invalid JSON request: stream must be true or false"),
            ("POST", "/v1/chat/completions", {"messages": user("x"), "max_tokens": "5"}, 400,
             "invalid JSON request: max_tokens must be a number"),
            ("POST", "/v1/chat/completions", {"messages": user("x"), "temperature": [1]}, 400,
             "invalid JSON request: temperature must be a number"),
            ("POST", "/v1/chat/completions", {"messages": user("x"), "model": 7}, 400,
             "invalid JSON request: model must be a string"),
            ("POST", "/v1/chat/completions", b'{"messages":[{"role":"user","content":"\xff"}]}',
             400, "invalid JSON request: unable to decode byte 0xff near '\"' (line 1, column 39)"),
            ("POST", "/v1/chat/completions", {"model": "x"}, 400, "missing messages"),
            ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages must contain at least one message"),
            ("POST", "/v1/completions", {"max_tokens": 2}, 400, "missing prompt"),
            ("POST", "/v1/responses", {"input": "x", "previous_response_id": "resp_1"}, 400,
             "previous_response_id is not supported; replay full input instead"),
            ("POST", "/v1/chat/completions", {"messages": user("x"), "reasoning_effort": "huge"},
             400, "invalid JSON request"),
            ("GET", "/v1/nothing", None, 404, "unknown endpoint"),
            ("DELETE", "/v1/models", None, 405, "method not allowed: use GET"),
            ("GET", "/v1/chat/completions", None, 405, "method not allowed: use POST"),
            ("GET", "/v1/models/gpt-4", None, 404, "model not found: this server serves deepseek-v4-flash"),
        ]
        # out-of-range knobs and limits, several or token-id prompts: 400 naming the field
        for path, body, param in [("/v1/chat/completions", {"messages": user("x"), "max_tokens": -5}, "max_tokens"),
                                  ("/v1/chat/completions", {"messages": user("x"), "temperature": -1}, "temperature"),
                                  ("/v1/chat/completions", {"messages": user("x"), "top_p": 5}, "top_p"),
                                  ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt"),
                                  ("/v1/completions", {"prompt": ["a", "b"]}, "prompt")]:
            st, _, data = s.raw("POST", path, body)
            assert st == 400 and err_of(data)["param"] == param, (path, body, st, data)
        # HTTP/1.1 without a Host header is a 400 (RFC 9112); HTTP/1.0 may omit it
        for req, status in [(b"GET /v1/models HTTP/1.1\r\n\r\n", b" 400 "),
                            (b"GET /v1/models HTTP/1.0\r\n\r\n", b" 200 ")]:
            sock = socket.create_connection(("127.0.0.1", s.port))
            sock.sendall(req)
            head = sock.recv(4096)
            sock.close()
            assert head.startswith(b"HTTP/1.") and status in head.split(b"\r\n")[0], head[:200]
        # HEAD: GET's status and headers, no body (clients probing the server)
        st, hdr, data = s.raw("HEAD", "/v1/models", None)
        assert st == 200 and data == b"" and int(hdr["Content-Length"]) > 0, (st, hdr, data)
        assert s.raw("HEAD", "/v1/nothing", None)[0] == 404
        for method, path, body, status, msg in cases:
            st, hdr, data = s.raw(method, path, body)
            assert st == status, (path, body, st, data)
            m = err_of(data)["message"]
            assert m == msg or (msg.endswith(": ") and m.startswith(msg) and len(m) > len(msg)), (msg, m)
            assert err_of(data)["type"] == "invalid_request_error"
            assert hdr.get("Access-Control-Allow-Origin") == "*"
        # Anthropic error shape
        st, _, data = s.raw("POST", "/v1/messages", {"max_tokens": 3})
        assert st == 400 and json.loads(data) == {
            "type": "error", "error": {"type": "invalid_request_error", "message": "missing messages"}}
        st, _, data = s.raw("POST", "/v1/messages", {"max_tokens": 3, "messages": []})
        assert st == 400 and json.loads(data)["error"]["message"] == "messages must contain at least one message"
        # unknown fields are ignored
        st, _, data = s.raw("POST", "/v1/chat/completions",
                            {"messages": user("x"), "max_tokens": 1, "frobnicate": {"a": [1]},
                             "think": False})
        assert st == 200, data
        # context overflow
        st, _, data = s.raw("POST", "/v1/chat/completions", {"messages": user("hello " * 400)})
        e = err_of(data)
        assert st == 400 and e["code"] == "context_length_exceeded" and e["n_ctx"] == 256
        assert e["param"] == "messages" and e["n_prompt_tokens"] >= 256
        # a body over 64 MiB
        st, _, data = s.raw("POST", "/v1/chat/completions", b" " * (64 * 1024 * 1024 + 10))
        assert st == 413 and "too large" in err_of(data)["message"]
        # a body under it that would parse into ~2 GB (15M nested empty arrays in an unknown field; an
        # adversarial pass measured 2.1 GB for one such request): refused before parsing; commas inside
        # strings do not count, and 1M token ids still parse
        big = b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":1,"x":[' + b"[]," * (3 << 20) + b"[]]}"
        st, _, data = s.raw("POST", "/v1/chat/completions", big)
        assert st == 413 and "more than 2097152 values" in err_of(data)["message"], data[:300]
        st, _, data = s.raw("POST", "/v1/chat/completions",
                            {"messages": user("hi"), "max_tokens": 1, "x": "," * (3 << 20), "y": [7] * (1 << 20)})
        assert st == 200, data[:300]
        # OPTIONS preflight; "*" alone would not cover Authorization (Fetch standard)
        st, hdr, data = s.raw("OPTIONS", "/v1/chat/completions")
        assert st == 204 and data == b""
        assert "authorization" in hdr.get("Access-Control-Allow-Headers", "").lower()
        assert s.alive()
        st, _, _ = s.raw("GET", "/v1/models")
        assert st == 200


def test_server_api_key_required_when_set():
    with Server("--api-key", "sekrit") as s:
        st, hdr, data = s.raw("GET", "/v1/models")
        assert st == 401 and err_of(data)["message"] == "invalid API key"
        assert hdr.get("WWW-Authenticate") == "Bearer", hdr
        assert s.raw("GET", "/v1/models", headers={"Authorization": "Bearer sekrit"})[0] == 200
        assert s.raw("GET", "/v1/models", headers={"x-api-key": "sekrit"})[0] == 200


def test_server_queue_full_gets_429_and_server_stays_up():
    with Server("--queue", "1") as s:
        body = {"messages": user("Tell me a long story"), "max_tokens": 200, "temperature": 0,
                "think": False}
        results = []

        def one():
            results.append(s.raw("POST", "/v1/chat/completions", body, timeout=600))

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        codes = sorted(r[0] for r in results)
        assert codes.count(200) >= 2, codes
        assert codes.count(429) >= 1, codes
        for st, hdr, data in results:
            if st == 429:
                assert "busy" in err_of(data)["message"]
                assert hdr.get("Retry-After") == "1", hdr
        assert s.alive() and s.raw("GET", "/v1/models")[0] == 200


def test_server_client_disconnect_cancels_generation():
    with Server() as s:
        sock = socket.create_connection(("127.0.0.1", s.port))
        body = json.dumps({"messages": user("Write forever"), "max_tokens": 3000,
                           "stream": True, "think": False}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        got = b""
        while b"data:" not in got:
            got += sock.recv(4096)
        sock.close()
        assert s.wait_log(r"finish=error client stream write failed", timeout=60), s.log_text()
        # the worker is free again
        r = s.openai().chat.completions.create(model="m", messages=user("hi"), max_tokens=2,
                                               extra_body=NO_THINK)
        assert r.usage.completion_tokens <= 2


def test_server_stop_sequences_cut_output_streaming_and_not():
    kw = dict(model="m", messages=user("Count with me"), max_tokens=16, temperature=0,
              extra_body=NO_THINK)
    with Server() as s:
        c = s.openai()
        full = c.chat.completions.create(**kw).choices[0].message.content
        assert len(full) >= 6, full
        stop = full[3:6]
        want = full[:full.index(stop)]
        r = c.chat.completions.create(stop=[stop, "zzqq-never-zzqq"], **kw)
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].message.content == want
        parts = list(c.chat.completions.create(stop=stop, stream=True, **kw))
        assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == want
        z = c.chat.completions.create(**dict(kw, max_tokens=0))
        assert z.choices[0].finish_reason == "length" and z.usage.completion_tokens == 0


def test_server_tool_loop_reuses_live_kv_with_exact_dsml_replay():
    """Agent loop: the client sends back the call it got plus a tool result;
    the exact sampled DSML is replayed (TEXT C.8), so the new prompt extends
    the live KV instead of being prefilled again."""
    kw = dict(model="deepseek-v4-flash", tools=[BASH_TOOL], max_tokens=80, temperature=0,
              extra_body=NO_THINK)
    with Server() as s:
        c = s.openai()
        msgs = user("List the files")
        a = c.chat.completions.create(messages=msgs, tool_choice="required", **kw)
        call = a.choices[0].message.tool_calls[0]
        msgs = msgs + [
            {"role": "assistant", "content": a.choices[0].message.content or "",
             "tool_calls": [{"id": call.id, "type": "function",
                             "function": {"name": "bash", "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": "a.txt\nb.txt\n"}]
        b = c.chat.completions.create(messages=msgs, max_tokens=4, model="m", tools=[BASH_TOOL],
                                      temperature=0, extra_body=NO_THINK)
        live = a.usage.prompt_tokens + a.usage.completion_tokens
        assert b.usage.prompt_tokens_details.cached_tokens >= live - 1, (b.usage, live)
        assert "kv reuse text-prefix" in s.log_text() or "kv reuse token-prefix" in s.log_text()


def test_server_forced_call_refuses_a_schema_it_cannot_keep():
    """A forced call is built from the tool's parameter schema, so a schema that cannot be kept is a 400 naming
    the tool (an adversarial pass got {"x": 374} without the required "y", and {"x": 1} for a string enum of
    numbers, both reported as finished calls); the same tools under tool_choice auto, where nothing enforces the
    schema, still run, and a named choice checks only the named tool."""
    def tool(name, params):
        return {"type": "function", "function": {"name": name, "parameters": params}}
    bad = [{"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x", "y"]},
           {"type": "object", "properties": {"x": {"type": "string", "enum": [1, 2]}}, "required": ["x"]},
           {"type": "object", "properties": {"x": {"type": "integer", "enum": ["a", "b"]}}}]
    with Server() as s:
        for params in bad:
            body = {"messages": user("go"), "max_tokens": 60, "temperature": 0, "think": False,
                    "tools": [tool("f", params)], "tool_choice": "required"}
            st, _, data = s.raw("POST", "/v1/chat/completions", body)
            e = err_of(data)
            assert st == 400 and e["param"] == "tools" and "tool 'f' cannot be forced" in e["message"], data
            st, _, data = s.raw("POST", "/v1/chat/completions", dict(body, tool_choice="auto"))
            assert st == 200, data
            named = dict(body, tools=[tool("f", params), BASH_TOOL],
                         tool_choice={"type": "function", "function": {"name": "bash"}})
            st, _, data = s.raw("POST", "/v1/chat/completions", named)
            assert st == 200, data
        # Anthropic: the same rule on input_schema
        st, _, data = s.raw("POST", "/v1/messages", {
            "max_tokens": 60, "messages": [{"role": "user", "content": "go"}], "tool_choice": {"type": "any"},
            "tools": [{"name": "f", "input_schema": bad[0]}]})
        assert st == 400 and "tool 'f' cannot be forced" in json.loads(data)["error"]["message"], data
        assert s.alive()


def test_server_forced_call_next_turn_equals_a_fresh_server():
    """A forced call's fixed DSML (the tags, the chosen name's rest) is written as the tokenizer writes that text,
    so the next turn reuses tokens a fresh server would read from the same conversation, and its reply is the
    fresh server's. The longest-match tokens used before ('tool' '_call' 's' for the tokenizer's 'tool' '_c'
    'alls') kept the token count, so the text-prefix rule reused them and the reply differed."""
    kw = dict(model="m", tools=[BASH_TOOL], temperature=0, seed=5, extra_body=NO_THINK)
    msgs = user("Hi, who are you?")
    with Server() as s:
        c = s.openai()
        a = c.chat.completions.create(messages=msgs, tool_choice="required", max_tokens=44, **kw)
        call = a.choices[0].message.tool_calls[0]
        msgs = msgs + [
            {"role": "assistant", "content": "", "tool_calls": [{"id": call.id, "type": "function", "function": {
                "name": call.function.name, "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": "file.txt"}]
        live = c.chat.completions.create(messages=msgs, max_tokens=12, **kw)
        assert live.usage.prompt_tokens_details.cached_tokens > 0, live.usage
        assert "kv reuse token-prefix" in s.log_text(), s.log_text()[-2000:]
    with Server() as s:
        fresh = s.openai().chat.completions.create(messages=msgs, max_tokens=12, **kw)
    assert live.choices[0].message.content == fresh.choices[0].message.content
    assert live.usage.prompt_tokens == fresh.usage.prompt_tokens


def test_server_top_p_0_keeps_only_the_top_token():
    """top_p 0 at temperature 1 is the greedy text (the smallest nucleus, as the OpenAI and Anthropic APIs mean
    it), not the unrestricted sample (the sampler's own rule reads p <= 0 as no top-p)."""
    kw = dict(model="m", messages=user("hi"), max_tokens=8, seed=1, extra_body=NO_THINK)
    with Server() as s:
        c = s.openai()
        greedy = c.chat.completions.create(temperature=0, **kw).choices[0].message.content
        p0 = c.chat.completions.create(temperature=1, top_p=0, **kw).choices[0].message.content
        free = c.chat.completions.create(temperature=1, top_p=1, **kw).choices[0].message.content
        ak = dict(model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        a_greedy = s.anthropic().messages.create(
            **ak, extra_body={"thinking": {"type": "disabled"}, "temperature": 0}).content[0].text
        a_p0 = s.anthropic().messages.create(
            **ak, extra_body={"thinking": {"type": "disabled"}, "temperature": 1, "top_p": 0}).content[0].text
    assert p0 == greedy and free != greedy, (greedy, p0, free)
    assert a_p0 == a_greedy


def test_server_max_tokens_minus_one_is_the_context_not_the_default():
    """max_tokens -1 means no limit but the context (docs/SERVING.md B.4, llama.cpp's convention) on every API; an
    absent max_tokens is the server's -n. -1 used to mean "absent" and gave -n tokens."""
    with Server("-n", "4", ctx=64) as s:
        c = s.openai()
        kw = dict(model="m", messages=user("hi"), temperature=0, extra_body=NO_THINK)
        absent = c.chat.completions.create(**kw)
        assert absent.usage.completion_tokens == 4 and absent.choices[0].finish_reason == "length"
        full = c.chat.completions.create(max_tokens=-1, **kw)
        # (random weights: the text runs to the context unless an EOS comes first)
        assert full.usage.completion_tokens > 4, full.usage
        assert full.usage.prompt_tokens + full.usage.completion_tokens <= 64, full.usage
        st, _, data = s.raw("POST", "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": -1,
                                                         "temperature": 0})
        assert st == 200 and json.loads(data)["usage"]["completion_tokens"] > 4, data
        st, _, data = s.raw("POST", "/v1/messages", {"model": "m", "max_tokens": -1, "messages": user("hi"),
                                                      "thinking": {"type": "disabled"}, "temperature": 0})
        assert st == 200 and json.loads(data)["usage"]["output_tokens"] > 4, data


def test_server_unknown_transfer_coding_is_501_at_once():
    """A body in a transfer coding other than chunked (gzip, "gzip, chunked") is answered 501 as soon as the
    headers arrive; it used to get no byte back until the 10 s idle timeout closed the connection."""
    body = json.dumps({"messages": user("hi"), "max_tokens": 1}).encode()
    with Server() as s:
        for te in (b"gzip", b"gzip, chunked"):
            sock = socket.create_connection(("127.0.0.1", s.port), timeout=5)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json"
                         b"\r\nTransfer-Encoding: %s\r\n\r\n" % (s.port, te) + body)
            reply = sock.recv(65536)
            sock.close()
            assert reply.startswith(b"HTTP/1.1 501") and b"Transfer-Encoding " + te + b" is not supported" in reply, reply


def test_server_repeated_header_lines_and_oversized_bodies_are_refused_at_the_headers():
    """libmicrohttpd's lookup sees only a header's first line: two Host lines (RFC 9112 3.2), two Content-Type
    lines (json then text/plain passed, the reverse got 415), Content-Encoding identity then gzip (passed; one
    line "identity, gzip" got 415) and Transfer-Encoding chunked then gzip (passed; one line got 501) are refused
    as their one-line forms are. A body over the limit is answered 413 at once when the client waits for 100
    Continue (it got "100 Continue", an invitation to upload 70 MB for nothing) or claims a terabyte (no reply
    until the request deadline). PUT/DELETE/PATCH on the model's path are 405 with Allow (they were 404)."""
    body = json.dumps({"messages": user("hi"), "max_tokens": 1, "think": False}).encode()

    def send(req, timeout=10):
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=timeout)
        sock.sendall(req)
        out = b""
        try:
            while True:
                d = sock.recv(65536)
                if not d:
                    break
                out += d
        except (socket.timeout, ConnectionResetError):
            pass
        sock.close()
        return out

    def post(extra, data=body):
        return send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n" + extra +
                    b"Content-Length: %d\r\n\r\n" % len(data) + data)
    with Server() as s:
        r = send(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nHost: evil.com\r\n\r\n")
        assert r.startswith(b"HTTP/1.1 400") and b"more than one Host" in r, r[:300]
        for cts in ((b"application/json", b"text/plain"), (b"text/plain", b"application/json")):
            r = post(b"".join(b"Content-Type: " + ct + b"\r\n" for ct in cts))
            assert r.startswith(b"HTTP/1.1 400") and b"more than one Content-Type" in r, r[:300]
        r = post(b"Content-Type: application/json\r\nContent-Encoding: identity\r\nContent-Encoding: gzip\r\n")
        assert r.startswith(b"HTTP/1.1 415") and b"Content-Encoding gzip" in r, r[:300]
        r = post(b"Content-Type: application/json\r\nContent-Encoding: identity\r\nContent-Encoding: identity\r\n")
        assert r.startswith(b"HTTP/1.1 200"), r[:300]
        r = send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        assert r.startswith(b"HTTP/1.1 501"), r[:300]
        t0 = time.time()
        r = send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Expect: 100-continue\r\nContent-Length: 70000000\r\n\r\n")
        assert r.startswith(b"HTTP/1.1 413") and b"100 Continue" not in r and b"too large" in r, r[:300]
        r = send(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000000000000\r\n\r\n{}")
        assert r.startswith(b"HTTP/1.1 413") and b"request_too_large" in r, r[:300]  # Anthropic's error type
        assert time.time() - t0 < 5
        for m in (b"PUT", b"DELETE", b"PATCH"):
            r = send(m + b" /v1/models/deepseek-v4-flash HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
            assert r.startswith(b"HTTP/1.1 405") and b"Allow: GET, HEAD, OPTIONS" in r, r[:300]
        assert s.alive()


def test_server_content_parts_of_the_wrong_type_are_400_and_models_carry_anthropic_fields():
    """A chat content part that is a number, or whose text is not a string, and an Anthropic text block whose text
    is not a string, are a 400 naming the part (they were dropped: 200 with the user's text silently gone);
    media parts still become their placeholder. The model objects carry Anthropic's fields and the list its
    paging fields, which the anthropic SDK's models API reads."""
    with Server() as s:
        for content in ([{"type": "text", "text": 5}], [1, 2], [{"type": "text"}], ["ok", {"type": "text", "text": None}]):
            st, _, data = s.raw("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": content}],
                                                                 "max_tokens": 1})
            assert st == 400 and "content part" in err_of(data)["message"], (content, data)
        for content in ([{"type": "text", "text": 5}], [{"type": "text"}],
                        [{"type": "thinking", "thinking": 3, "signature": ""}]):
            st, _, data = s.raw("POST", "/v1/messages", {"messages": [{"role": "user", "content": content}],
                                                         "max_tokens": 1})
            assert st == 400 and json.loads(data)["error"]["type"] == "invalid_request_error", (content, data)
        st, _, data = s.raw("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}],
            "max_tokens": 1, "think": False})
        assert st == 200, data
        lst = list(s.anthropic().models.list())
        assert [m.id for m in lst] == ["deepseek-v4-flash"] and lst[0].type == "model", lst
        assert lst[0].display_name == "DeepSeek V4 Flash" and lst[0].created_at.year == 2026, lst[0]
        one = s.anthropic().models.retrieve("deepseek-v4-flash")
        assert one.id == "deepseek-v4-flash" and one.type == "model"
        st, _, data = s.raw("GET", "/v1/models")
        doc = json.loads(data)
        assert doc["has_more"] is False and doc["first_id"] == doc["last_id"] == "deepseek-v4-flash", doc
        assert s.openai().models.retrieve("deepseek-v4-flash").owned_by == "ds4.c"


def test_server_trace_write_failure_is_logged_once_and_requests_go_on():
    """--trace to a full device (/dev/full): every trace write was dropped without a word. The first failure is
    logged once, naming the file; the requests are served."""
    with Server("--trace", "/dev/full") as s:
        c = s.openai()
        for _ in range(3):
            r = c.chat.completions.create(model="m", messages=user("hi"), max_tokens=2, extra_body=NO_THINK)
            assert r.choices[0].message.content is not None
        lines = [x for x in s.log if "--trace /dev/full: writing failed" in x]
        assert len(lines) == 1 and "No space left" in lines[0], s.log[-10:]


def test_server_sse_headers_and_keepalive_during_long_prefill():
    """A streaming request with a long prompt gets its SSE headers at the
    first prefill progress event and ': prefill' comments every >= 5 s, so
    clients do not time out before the first token."""
    with Server(ctx=8192) as s:
        body = json.dumps({"messages": user("word " * 3800), "max_tokens": 2, "stream": True,
                           "think": False}).encode()
        sock = socket.create_connection(("127.0.0.1", s.port))
        t0 = time.time()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        buf, t_headers, t_data = b"", None, None
        while True:
            d = sock.recv(65536)
            if not d:
                break
            buf += d
            now = time.time() - t0
            if t_headers is None and b"\r\n\r\n" in buf:
                t_headers = now
            if t_data is None and b"data: " in buf:
                t_data = now
        sock.close()
        head = buf.split(b"\r\n\r\n", 1)[0].decode()
        assert head.startswith("HTTP/1.1 200") and "text/event-stream" in head
        assert "no-cache" in head
        m = re.search(r"prefill chatcmpl-[0-9a-f]{24}: prompt=(\d+) cached=0 \(([\d.]+) s\)",
                      s.log_text())
        assert m and int(m.group(1)) > 3000
        prefill_s = float(m.group(2))
        assert t_headers < t_data
        if prefill_s > 1.0:
            assert t_headers < prefill_s / 2, (t_headers, prefill_s)
        if prefill_s >= 6.0:
            assert b": prefill\n\n" in buf
        assert buf.rstrip().endswith(b"data: [DONE]") or b"data: [DONE]" in buf


def test_server_anthropic_tool_loop_reuses_live_kv_and_thinking_precedes_tool_use():
    tool = ANTH_BASH  # (an integer argument the random model closes: a call it ended itself)
    with Server() as s:
        c = s.anthropic()
        msgs = user("List files")
        a = c.messages.create(model="m", max_tokens=80, messages=msgs, tools=[tool],
                              tool_choice={"type": "any"}, thinking={"type": "disabled"},
                              extra_body=T0)
        use = [b for b in a.content if b.type == "tool_use"][0]
        msgs = msgs + [{"role": "assistant", "content": [b.to_dict() for b in a.content]},
                       {"role": "user", "content": [{"type": "tool_result",
                                                     "tool_use_id": use.id, "content": "a.txt"}]}]
        b = c.messages.create(model="m", max_tokens=2, messages=msgs, tools=[tool],
                              thinking={"type": "disabled"}, extra_body=T0)
        live = prompt_tokens(a.usage) + a.usage.output_tokens
        assert b.usage.cache_read_input_tokens >= live - 1, (b.usage, live)
        # thinking on: the reasoning block comes first, then the forced call
        t = c.messages.create(model="m", max_tokens=160, messages=user("List files"),
                              tools=[tool], tool_choice={"type": "tool", "name": "Bash"})
        kinds = [blk.type for blk in t.content]
        assert kinds[0] == "thinking" and kinds[-1] == "tool_use", kinds
        assert t.content[0].signature == t.id and t.stop_reason == "tool_use"
        assert a.stop_reason == "tool_use" and isinstance(use.input["lines"], int), a


def stream_then_sigterm(s, path, body, marker):
    """Starts a stream, sends SIGTERM after 3 `marker` events and returns every byte the stream got."""
    sock = socket.create_connection(("127.0.0.1", s.port))
    data = json.dumps(body).encode()
    sock.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
    got = b""
    while got.count(marker) < 3:
        got += sock.recv(4096)
    s.proc.send_signal(signal.SIGTERM)
    sock.settimeout(60)
    while True:
        d = sock.recv(65536)
        if not d:
            break
        got += d
    sock.close()
    return got


def test_server_sigterm_ends_streams_with_error_finish_and_exits_0():
    s = Server()
    try:
        got = stream_then_sigterm(s, b"/v1/chat/completions", {"messages": user("Write forever"), "max_tokens": 3000,
                                                                "stream": True, "think": False}, b"data:")
        assert b'"finish_reason":"error"' in got and b"data: [DONE]" in got
        assert s.proc.wait(60) == 0
        assert "shutdown requested" in s.log_text()
    finally:
        s.stop()


def test_server_sigterm_ends_an_anthropic_stream_with_an_error_event():
    """Anthropic has no error stop_reason: a stream cut by shutdown ends with an `error` event (overloaded),
    never with message_delta end_turn, which would make the truncated reply look complete."""
    s = Server()
    try:
        got = stream_then_sigterm(s, b"/v1/messages", {"model": "m", "messages": user("Write forever"),
                                                        "max_tokens": 3000, "stream": True, "think": False},
                                  b"content_block_delta")
        assert b"event: error" in got and b'"overloaded_error"' in got, got[-400:]
        assert b"message_stop" not in got and b'"end_turn"' not in got, got[-400:]
        assert s.proc.wait(60) == 0
    finally:
        s.stop()


def test_server_stop_strings_do_not_cut_a_tool_call():
    """A stop string that occurs in the DSML markup (here the invoke tag) does not cut the forced call: stops
    end the reply's text, and a tool-call block is markup."""
    with Server("--debug-reply", BASH_CALL) as s:
        c = s.openai()
        for stops in (["invoke", "tool_calls>"], ["a"], ["tool"], ["DSML"], ["<"], ["\n"]):
            # the last four match the block's opening tag or the blank line before it: such a stop waits until
            # the text there turns out to be a block (then it was markup) or plain text (then it holds)
            r = c.chat.completions.create(model="m", messages=user("List the files"), tools=[BASH_TOOL],
                                          tool_choice="required", max_tokens=120, seed=7, stop=stops,
                                          extra_body={"think": False})  # (stops also cut reasoning text)
            assert r.choices[0].finish_reason == "tool_calls", (stops, r)
            assert r.choices[0].message.tool_calls and "DSML" not in (r.choices[0].message.content or ""), stops
            assert json.loads(r.choices[0].message.tool_calls[0].function.arguments)["command"] == \
                "ls -la /tmp && echo done", stops
        # with tools offered but plain text generated, a stop still cuts the text
        r = c.chat.completions.create(model="m", messages=user("Tell me a story"), tools=[BASH_TOOL], max_tokens=60,
                                      temperature=0, stop=["e"], extra_body={"think": False})
        assert r.choices[0].finish_reason in ("stop", "tool_calls"), r
        if r.choices[0].finish_reason == "stop":
            assert "e" not in (r.choices[0].message.content or "")
        a = s.anthropic()
        m = a.messages.create(model="m", messages=user("List the files"), max_tokens=120,
                              tools=[{"name": "Bash", "input_schema": BASH_TOOL["function"]["parameters"]}],
                              tool_choice={"type": "any"}, stop_sequences=["invoke"], extra_body={"seed": 7})
        assert m.stop_reason == "tool_use" and m.content[-1].type == "tool_use", m


# (an integer argument: the random demo model closes no free string value, so a forced call with one runs to
# the limit and ends as cut (forced.c); the tool-loop tests need calls the model closed)
ANTH_BASH = {"name": "Bash", "description": "Run a command",
             "input_schema": {"type": "object", "properties": {"lines": {"type": "integer"}},
                              "required": ["lines"]}}
NO_THINK_ANTH = dict(thinking={"type": "disabled"}, extra_body=T0)


def anthropic_tool_turn(c, text="List files"):
    """One forced greedy tool turn; returns (message, tool_use block)."""
    a = c.messages.create(model="m", max_tokens=80, messages=user(text), tools=[ANTH_BASH],
                          tool_choice={"type": "any"}, **NO_THINK_ANTH)
    assert a.stop_reason == "tool_use", a
    return a, [b for b in a.content if b.type == "tool_use"][0]


def tool_result(use_id, content):
    return {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use_id,
                                         "content": content}]}


def test_server_anthropic_tool_output_only_continues_live_binding_like_full_replay():
    """docs/SERVING.md C.2 rule 3: a follow-up carrying only the tool_result for the
    live binding's call (the assistant turn not replayed) continues from the
    live KV (cached = live length) and gives the same greedy continuation as
    the request that replays the whole history."""
    with Server() as s:
        c = s.anthropic()
        a, use = anthropic_tool_turn(c)
        live = prompt_tokens(a.usage) + a.usage.output_tokens
        short = user("List files") + [tool_result(use.id, "a.txt\nb.txt\n")]
        b = c.messages.create(model="m", max_tokens=12, messages=short, tools=[ANTH_BASH],
                              **NO_THINK_ANTH)
        assert b.usage.cache_read_input_tokens == live, (b.usage, live)
        assert "kv reuse tool-output: cached %d.." % live in s.log_text()
        # the same turn again (greedy: same call, fresh id), then the full replay
        a2, use2 = anthropic_tool_turn(c)
        assert use2.input == use.input and use2.id != use.id
        full = user("List files") + [
            {"role": "assistant", "content": [blk.to_dict() for blk in a2.content]},
            tool_result(use2.id, "a.txt\nb.txt\n")]
        f = c.messages.create(model="m", max_tokens=12, messages=full, tools=[ANTH_BASH],
                              **NO_THINK_ANTH)
        # thinking off: the live KV holds exactly what the full replay renders
        # (exact DSML replay, TEXT C.8), so both continue from the same tokens
        assert f.usage.cache_read_input_tokens == live, (f.usage, live)
        assert f.usage.input_tokens == b.usage.input_tokens
        assert [x.to_dict() for x in f.content] == [x.to_dict() for x in b.content]
        assert f.usage.output_tokens == b.usage.output_tokens and f.stop_reason == b.stop_reason


def test_server_tool_output_shortcut_needs_the_same_system_and_tools():
    """C.2 rules 2/3 continue the live state with only the tool outputs: a follow-up whose system prompt or tool
    list changed (Claude Code adding an MCP tool) continued the old state, so the model never saw the change. Now
    such a request takes another rule (a full replay: its own prompt, the same reply as a fresh server gives) or,
    carrying only the outputs, a 409; parallel calls cut to one (disable_parallel_tool_use) leave no binding."""
    import anthropic
    read = dict(ANTH_BASH, name="Read", description="Read a file")
    with Server() as s:
        c = s.anthropic()
        a, use = anthropic_tool_turn(c)
        full = user("List files") + [{"role": "assistant", "content": [b.to_dict() for b in a.content]},
                                     tool_result(use.id, "a.txt\n")]
        kw = dict(model="m", max_tokens=12, messages=full, tools=[ANTH_BASH, read], **NO_THINK_ANTH)
        b = c.messages.create(**kw)
        assert "kv reuse tool-output" not in s.log_text(), s.log_text()[-2000:]
        _, use2 = anthropic_tool_turn(c)
        with pytest.raises(anthropic.ConflictError):
            c.messages.create(model="m", max_tokens=4, system="Another system prompt", tools=[ANTH_BASH],
                              messages=user("List files") + [tool_result(use2.id, "a.txt\n")], **NO_THINK_ANTH)
        # the same outputs with the turn's own system and tools still continue the live state
        ok = c.messages.create(model="m", max_tokens=4, tools=[ANTH_BASH],
                               messages=user("List files") + [tool_result(use2.id, "a.txt\n")], **NO_THINK_ANTH)
        assert ok.usage.cache_read_input_tokens > 0 and s.log_text().count("kv reuse tool-output") == 1
    with Server() as s2:
        fresh = s2.anthropic().messages.create(**kw)
    assert [x.to_dict() for x in fresh.content] == [x.to_dict() for x in b.content]


def test_server_tool_output_shortcut_needs_the_turn_as_sampled():
    """C.2 rule 2 continues the live state with only the tool outputs when the request replays the turn: it took
    any request that began with the turn's head and ended with the bound outputs, so an edited tool_use input, a
    renamed call or a message inserted before the outputs never reached the model (the reply was the unedited
    one). Now what lies between the head and the outputs must be the turn's own assistant message (with or
    without its reasoning, the calls as sampled or canonical); otherwise another rule serves the request, and the
    reply equals a fresh server's."""
    def follow(a, how):
        content = [b.to_dict() for b in a.content]
        use = [b for b in content if b["type"] == "tool_use"][0]
        if how == "edit":
            use["input"] = {"command": "rm -rf / --no-preserve-root"}
        if how == "rename":
            use["name"] = "Bash2"
        msgs = user("List files") + [{"role": "assistant", "content": content}]
        if how == "insert":
            msgs.append({"role": "user", "content": "Also mind the hidden files."})
        msgs.append(tool_result(use["id"], "a.txt"))
        return msgs
    kw = dict(model="m", max_tokens=8, tools=[ANTH_BASH, dict(ANTH_BASH, name="Bash2")], **NO_THINK_ANTH)
    got = {}
    with Server() as s:
        c = s.anthropic()
        for how in ("same", "edit", "rename", "insert"):
            a = c.messages.create(model="m", max_tokens=80, messages=user("List files"), tools=kw["tools"],
                                  tool_choice={"type": "tool", "name": "Bash"}, **NO_THINK_ANTH)
            assert a.stop_reason == "tool_use", a
            n0 = s.log_text().count("kv reuse tool-output")
            msgs = follow(a, how)
            b = c.messages.create(messages=msgs, **kw)
            took = s.log_text().count("kv reuse tool-output") - n0
            assert took == (how == "same"), (how, s.log_text()[-1500:])
            got[how] = (msgs, [x.to_dict() for x in b.content], prompt_tokens(b.usage))
    with Server() as s2:
        c = s2.anthropic()
        for how in ("edit", "rename", "insert"):
            msgs, content, n = got[how]
            f = c.messages.create(messages=msgs, **kw)
            assert [x.to_dict() for x in f.content] == content and prompt_tokens(f.usage) == n, how


def test_server_tool_output_without_call_or_live_binding_gets_400():
    """B.4: an output whose call is neither in the request nor in the live
    binding is a 400 naming the id (Anthropic and Responses); a binding of
    the other API does not count."""
    import anthropic
    import openai
    with Server() as s:
        c = s.anthropic()
        _, use = anthropic_tool_turn(c)
        with pytest.raises(anthropic.BadRequestError) as ei:
            c.messages.create(model="m", max_tokens=4, messages=user("x") + [
                tool_result("toolu_nope", "r")], **NO_THINK_ANTH)
        assert ei.value.response.json()["error"]["message"] == (
            "Anthropic continuation state is not available for tool_use_id toolu_nope; "
            "retry by replaying the full messages history")
        o = s.openai()
        with pytest.raises(openai.BadRequestError) as ei:
            o.responses.create(model="m", max_output_tokens=4, input=[
                {"role": "user", "content": "x"},
                {"type": "function_call_output", "call_id": use.id, "output": "r"}])
        assert ei.value.response.json()["error"] == {
            "message": "Responses continuation state is not available for call_id %s; retry by "
                       "replaying the full input history" % use.id,
            "type": "invalid_request_error", "param": "input", "code": None}
        # the binding survived the rejected requests
        b = c.messages.create(model="m", max_tokens=4, messages=user("List files") + [
            tool_result(use.id, "ok")], tools=[ANTH_BASH], **NO_THINK_ANTH)
        assert b.usage.cache_read_input_tokens > 0


def test_server_tool_output_for_binding_gone_at_execution_gets_409_and_server_stays_up():
    """C.2 rule 4: a request whose tool output relies only on the live binding
    is accepted while the binding exists, but when another request has moved
    the live session by the time it runs, it gets 409 with a JSON error."""
    import anthropic
    with Server() as s:
        c = s.anthropic()
        a, use = anthropic_tool_turn(c)
        # B1 answers the binding with a long output (> one 2048-token prefill
        # chunk): its SSE headers arrive after the first chunk, while the
        # binding is still in place (cleared after a successful prefill)
        big = "".join("file_%04d.txt\n" % i for i in range(560))
        body = {"model": "m", "max_tokens": 2, "stream": True, "temperature": 0,
                "thinking": {"type": "disabled"}, "tools": [ANTH_BASH],
                "messages": user("List files") + [tool_result(use.id, big)]}
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=300)
        conn.request("POST", "/v1/messages", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        r1 = conn.getresponse()
        assert r1.status == 200
        # B2 (only the tool output) is validated now, runs after B1 -> 409
        with pytest.raises(anthropic.ConflictError) as ei:
            c.messages.create(model="m", max_tokens=4, messages=user("List files") + [
                tool_result(use.id, "small")], tools=[ANTH_BASH], **NO_THINK_ANTH)
        stream1 = r1.read().decode()
        conn.close()
        assert "message_stop" in stream1
        assert ei.value.status_code == 409
        assert ei.value.response.json() == {"type": "error", "error": {
            "type": "invalid_request_error",
            "message": "Anthropic continuation state is not available; retry by replaying the "
                       "full messages history"}}
        assert "kv reuse tool-output" in s.log_text()
        # B1 used the binding: the server is up and a plain request works
        ok = c.messages.create(model="m", max_tokens=3, messages=user("hi"), **NO_THINK_ANTH)
        assert ok.usage.output_tokens > 0 and s.alive()


def test_server_rejects_unusable_tool_names_and_endless_stop_lists():
    """A function tool without a usable name (missing, empty, not a string, or with characters the DSML invoke
    header cannot carry) is a 400 naming the tool, in every API; hosted tools without a name pass; more than 256
    stop strings is a 400."""
    fn = lambda f: {"type": "function", "function": dict({"parameters": {"type": "object"}}, **f)}
    bad = [fn({}), fn({"name": ""}), fn({"name": 7}), fn({"name": 'a"b'}), fn({"name": "a\nb"}),
           fn({"name": "<x>"}), fn({"name": "a\uff5cDSML\uff5cb"}),
           # a function by its type alone: shown to the model as a schema named by nothing (an outside pass)
           {}, {"type": "function"},
           # a parameters schema that is no object
           fn({"name": "f", "parameters": "x"}), fn({"name": "f", "parameters": []})]
    with Server(ctx=512) as s:
        for t in bad:
            st, _, data = s.raw("POST", "/v1/chat/completions",
                                {"messages": user("x"), "max_tokens": 1, "think": False, "tools": [t]})
            assert st == 400 and "tools[0]" in err_of(data)["message"], (t, st, data)
        st, _, data = s.raw("POST", "/v1/messages", {"max_tokens": 1, "messages": user("x"),
                                                     "tools": [{"input_schema": {"type": "object"}}]})
        assert st == 400 and "tools[0]" in json.loads(data)["error"]["message"], data
        for t in ({"type": "function", "name": "", "parameters": {"type": "object"}}, {"type": "function"}, {}):
            st, _, data = s.raw("POST", "/v1/responses", {"input": "x", "max_output_tokens": 1, "tools": [t]})
            assert st == 400 and "tools[0]" in err_of(data)["message"], (t, data)
        # good names, and a hosted tool without one, are served
        st, _, data = s.raw("POST", "/v1/responses", {"input": "x", "max_output_tokens": 1,
                                                      "tools": [{"type": "web_search"},
                                                                {"type": "function", "name": "mcp__git.log-2",
                                                                 "parameters": {"type": "object"}}]})
        assert st == 200, data
        st, _, data = s.raw("POST", "/v1/chat/completions", {"messages": user("x"), "max_tokens": 1,
                                                             "stop": ["s%d" % i for i in range(257)]})
        assert st == 400 and "stop" in err_of(data)["message"], data
        st, _, data = s.raw("POST", "/v1/chat/completions", {"messages": user("x"), "max_tokens": 1,
                                                             "stop": ["s%d" % i for i in range(256)]})
        assert st == 200, data


def test_server_seeds_use_the_whole_64_bit_range():
    """Seeds above 2^31 are distinct streams (they were clamped to 2^31 - 1), and each reproduces itself."""
    def reply(s, seed):
        st, _, data = s.raw("POST", "/v1/chat/completions", {"messages": user("Tell me a story"), "think": False,
                                                             "temperature": 1, "max_tokens": 12, "seed": seed})
        assert st == 200, data
        return json.loads(data)["choices"][0]["message"]["content"]
    with Server(ctx=512) as s:
        seeds = [2**31 - 1, 2**31, 2**32, 2**32 + 1, 2**63 - 1]
        got = [reply(s, x) for x in seeds]
        assert len(set(got)) == len(seeds), got
        assert reply(s, 2**32) == got[2] and reply(s, 2**63 - 1) == got[4]
        # 0 and negatives are seeds too (an outside pass met seed 0, the evaluation harnesses' usual one, giving
        # a different reply each time); only -1 (llama.cpp's "random") is not
        low = [0, -2, -2**40]
        got_low = [reply(s, x) for x in low]
        assert [reply(s, x) for x in low] == got_low
        assert len(set(got_low + got)) == len(low) + len(seeds), got_low
        assert len({reply(s, -1) for _ in range(3)}) > 1


def test_server_tool_call_cut_by_max_tokens_reports_the_limit():
    """A tool call that the token limit cuts (forced, so the block surely starts) ends with the limit's finish in
    every API (OpenAI length, Anthropic max_tokens, Responses incomplete), not a plain end of turn."""
    tool = {"type": "function", "function": {"name": "get", "parameters": {
        "type": "object", "properties": {"x": {"type": "string"}}}}}
    with Server(ctx=1024) as s:
        st, _, data = s.raw("POST", "/v1/chat/completions", {"messages": user("x"), "think": False, "max_tokens": 8,
                                                             "tools": [tool], "tool_choice": "required"})
        assert st == 200 and json.loads(data)["choices"][0]["finish_reason"] == "length", data
        st, _, data = s.raw("POST", "/v1/messages", {"max_tokens": 8, "messages": user("x"),
                                                     "thinking": {"type": "disabled"},
                                                     "tools": [{"name": "get", "input_schema": tool["function"]["parameters"]}],
                                                     "tool_choice": {"type": "any"}})
        assert st == 200 and json.loads(data)["stop_reason"] == "max_tokens", data
        st, _, data = s.raw("POST", "/v1/responses", {"input": "x", "max_output_tokens": 8,
                                                      "reasoning": {"effort": "none"},
                                                      "tools": [{"type": "function", "name": "get",
                                                                 "parameters": tool["function"]["parameters"]}],
                                                      "tool_choice": "required"})
        assert st == 200 and json.loads(data)["status"] == "incomplete", data
        assert s.alive()
