"""The `ds4` REPL driven through a pseudo-terminal (stdlib pty, no pexpect).

Checks /help, /nothink, /think-max, a two-turn conversation whose second
turn evaluates only the new suffix (the stderr line
"ds4: tokens: prompt P (reused R, evaluated E), generated G"), /ctx (a new
session: the next turn re-prefills everything), non-ASCII keys, Ctrl+C
stopping a generation without leaving and, at the prompt, discarding the
typed line (with -t 1, where SIGINT always reaches libedit's reader, and -t 2),
Ctrl+D, history in $HOME/.ds4_history, /quit.
The demo model's text is meaningless; only mechanics are checked.
"""
import os
import pty
import re
import select
import signal
import termios
import time

import pytest

from test_cli import DS4, STATS_RE, model  # noqa: F401  (fixture)


class Pty:
    def __init__(self, argv, home):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.environ["HOME"] = home
            os.environ["TERM"] = "xterm"
            os.environ["LC_ALL"] = "C"
            os.execv(argv[0], argv)
        self.buf = b""

    def expect(self, pattern, timeout=120):
        rx = re.compile(pattern)
        end = time.time() + timeout
        while True:
            m = rx.search(self.buf)
            if m:
                out = self.buf[:m.end()]
                self.buf = self.buf[m.end():]
                return out, m
            left = end - time.time()
            if left <= 0:
                raise AssertionError("timeout waiting for %r; tail: %r" % (pattern, self.buf[-800:]))
            r, _, _ = select.select([self.fd], [], [], min(left, 0.2))
            if r:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    raise AssertionError("EOF waiting for %r; tail: %r" % (pattern, self.buf[-800:]))
                self.buf += data

    def prompt(self, timeout=120):
        """Waits for "ds4> " and then for libedit's edit mode: libedit prints
        the prompt while the terminal is still cooked and switches it after,
        so a key sent at once could be cooked (a Ctrl+D then turns into a NUL
        byte in edit mode and is lost). tcgetattr on the master fd reads the
        terminal's modes."""
        out = self.expect(PROMPT_RX, timeout)
        end = time.time() + timeout
        while termios.tcgetattr(self.fd)[3] & termios.ICANON:
            if time.time() > end:
                raise AssertionError("the terminal stayed in cooked mode after the prompt")
            time.sleep(0.005)
        return out

    def send(self, s):
        os.write(self.fd, s)

    def wait(self, timeout=30):
        end = time.time() + timeout
        while time.time() < end:
            # drain so the child never blocks on a full pty
            r, _, _ = select.select([self.fd], [], [], 0.1)
            if r:
                try:
                    self.buf = (self.buf + os.read(self.fd, 65536))[-4000:]
                except OSError:
                    pass
            pid, st = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(st)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError("REPL did not exit; tail: %r" % self.buf[-800:])

    def close(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


PROMPT_RX = rb"ds4> "


def stats(out):
    m = STATS_RE.search(out.decode(errors="replace"))
    assert m, out[-500:]
    return tuple(int(x) for x in m.groups())


@pytest.fixture
def repl(model, tmp_path):  # noqa: F811
    procs = []

    def start(*extra, threads=2):
        p = Pty([DS4, "-m", model, "--cpu", "-t", str(threads), "--temp", "0"] + list(extra), str(tmp_path))
        procs.append(p)
        p.prompt()
        return p
    yield start
    for p in procs:
        p.close()


def test_cli_repl_help_modes_two_turns_reuse_ctx_quit(repl, tmp_path):
    p = repl("--ctx", "1024", "-n", "8")
    p.send(b"/help\r")
    out, _ = p.prompt()
    for cmd in (b"/think", b"/think-max", b"/nothink", b"/ctx N", b"/read FILE", b"/quit"):
        assert cmd in out
    p.send(b"/think-max\r")
    out, _ = p.prompt()
    assert b"thinking: high (ctx below 393216)" in out
    p.send(b"/nothink\r")
    out, _ = p.prompt()
    assert b"thinking: none" in out

    p.send(b"Hello there\r")
    out, _ = p.prompt()
    P1, R1, E1, G1 = stats(out)
    assert R1 == 0 and E1 == P1 and 1 <= G1 <= 8

    p.send(b"And a second question\r")
    out, _ = p.prompt()
    P2, R2, E2, G2 = stats(out)
    # The live KV holds the first turn: only the suffix (the last sampled
    # token, EOS, USER, the new text, ASSISTANT, </think>) is evaluated.
    assert R2 + E2 == P2
    # all sampled tokens but the last were evaluated (all of them if EOS ended it)
    assert R2 in (P1 + G1 - 1, P1 + G1), (P1, G1, R2)
    assert E2 <= 12, "second turn evaluated %d tokens, expected only the suffix" % E2

    p.send(b"/ctx 900\r")
    out, _ = p.prompt()
    assert b"context: 900 tokens" in out
    p.send(b"Third\r")
    out, _ = p.prompt()
    P3, R3, E3, _ = stats(out)
    assert R3 == 0 and E3 == P3 > P2, "a new session re-prefills the whole transcript"

    p.send(b"/bogus\r")
    out, _ = p.prompt()
    assert b"unknown command /bogus" in out
    # non-ASCII keys reach the REPL intact (libedit needs a UTF-8 LC_CTYPE;
    # the child runs in the "C" locale here, which the REPL upgrades)
    p.send("/bogus\u00e8\u20ac\u4e2d\r".encode())
    out, _ = p.prompt()
    assert "unknown command /bogus\u00e8\u20ac\u4e2d ".encode() in out, out

    readme = tmp_path / "q.txt"
    readme.write_text("A question from a file")
    p.send(b"/read " + str(readme).encode() + b"\r")
    out, _ = p.prompt()
    P4, R4, E4, _ = stats(out)
    assert R4 > 0 and R4 + E4 == P4

    p.send(b"/quit\r")
    assert p.wait() == 0
    hist = (tmp_path / ".ds4_history").read_text(errors="replace").replace("\\040", " ")  # libedit escapes
    assert "Hello there" in hist and "/ctx 900" in hist


# -t 1: no engine worker threads, so SIGINT always lands on the main thread
# (in libedit's read at the prompt); -t 2: it may land anywhere.
@pytest.mark.parametrize("threads", [1, 2])
def test_cli_repl_ctrl_c_stops_generation_and_stays(repl, threads):
    # --ignore-eos: each reply runs until the Ctrl+C (the random demo model
    # cannot end one on its own first)
    p = repl("--ctx", "4096", "-n", "100000", "--nothink", "--ignore-eos", threads=threads)
    p.send(b"Write forever\r")
    # wait until the prefill bar is complete, then let it generate a while
    p.expect(rb"100%")
    time.sleep(1.0)
    p.send(b"\x03")
    # expect, not prompt(): the next Ctrl+C goes out at once, while libedit
    # may still be between printing the prompt and its first read (the
    # window where a SIGINT used to be swallowed: no new prompt came)
    out, _ = p.expect(PROMPT_RX, timeout=60)
    assert b"ds4: interrupted" in out, out[-400:]
    P, R, E, G = stats(out)
    assert 0 < G < 4000
    p.send(b"\x03")
    p.prompt(timeout=30)
    # Ctrl+C at the prompt discards the typed text and shows a fresh prompt,
    # as in a shell; repeated, it neither leaves nor kills the REPL.
    p.send(b"half typed line")
    p.expect(rb"half typed line")
    p.send(b"\x03")
    p.prompt(timeout=30)
    p.send(b"\x03")
    p.prompt(timeout=30)
    p.send(b"/nothink\r")
    out, _ = p.prompt(timeout=30)
    assert b"thinking: none" in out, out
    assert b"unknown command" not in out and b"tokens: prompt" not in out, out
    # and a Ctrl+C stops the next generation too
    p.send(b"Write again\r")
    p.expect(rb"100%")
    time.sleep(0.3)
    p.send(b"\x03")
    out, _ = p.prompt(timeout=60)
    assert b"ds4: interrupted" in out, out[-600:]
    p.send(b"\x04")  # Ctrl+D leaves
    assert p.wait() == 0
