#!/usr/bin/env python3
"""Runs every test that needs no model and no GPU, and prints one summary.

1. build/ds4-test: the C unit tests (ASan + UBSan build), each in a child.
2. pytest over tests/py: cross-checks against gguf-py, HF tokenizers, the
   openai/anthropic SDKs, and end-to-end runs of the programs.

The last line is "N passed, N failed" (plus skipped); exit status is 1 when
anything failed. Extra arguments go to pytest (e.g. -k gguf).
"""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_c():
    env = dict(os.environ)
    # Leak checks off: tests fork and _exit; the sanitizers still catch
    # out-of-bounds access and undefined behaviour.
    env.setdefault("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=1")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    p = subprocess.run([os.path.join(ROOT, "build/ds4-test"), "--data-dir",
                        os.path.join(ROOT, "tests/data")], cwd=ROOT, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sys.stdout.write(p.stdout)
    m = re.search(r"^(\d+) passed, (\d+) failed, (\d+) skipped$", p.stdout, re.M)
    if not m:
        print("C test runner did not finish (exit %d)" % p.returncode)
        return 0, 1, 0
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def junit_counts(junit):
    """(passed, failed, skipped) of a pytest junit file (errors count as failures)."""
    import xml.etree.ElementTree as ET
    passed = failed = skipped = 0
    for tc in ET.parse(junit).getroot().iter("testcase"):
        kids = {c.tag for c in tc}
        if "failure" in kids or "error" in kids:
            failed += 1
        elif "skipped" in kids:
            skipped += 1
        else:
            passed += 1
    return passed, failed, skipped


def run_py(extra):
    junit = os.path.join(ROOT, "build", "pytest.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
           "--junitxml", junit, os.path.join(ROOT, "tests/py")] + extra
    p = subprocess.run(cmd, cwd=ROOT)
    if not os.path.exists(junit):
        return 0, 1, 0
    passed, failed, skipped = junit_counts(junit)
    if p.returncode not in (0, 1, 5) and failed == 0:
        failed = 1  # pytest itself broke (collection error, crash)
    return passed, failed, skipped


def main():
    extra = sys.argv[1:]
    print("== C unit tests (build/ds4-test, ASan+UBSan)", flush=True)
    cp, cf, cs = run_c() if not extra else (0, 0, 0)
    print("== Python tests (pytest tests/py)", flush=True)
    pp, pf, ps = run_py(extra)
    passed, failed, skipped = cp + pp, cf + pf, cs + ps
    print("C: %d passed, %d failed, %d skipped; Python: %d passed, %d failed, %d skipped"
          % (cp, cf, cs, pp, pf, ps))
    print("%d passed, %d failed, %d skipped" % (passed, failed, skipped))
    return 1 if failed or passed == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
