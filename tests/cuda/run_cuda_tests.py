#!/usr/bin/env python3
"""make test-cuda: the GPU tests, with one summary line.

1. build/cuda/test_stages: every backend stage, CUDA vs CPU (writes its small models to DS4_STAGE_MODELS).
2. pytest tests/cuda: oracle fixtures, eval-mode and run-to-run bit equality, graphs, quantized models.
Last line: "N passed, N failed"; exit 1 on any failure. Runs with any python3 that has numpy and pytest (the
GPU machine has no package registry, so no virtualenv is made here).
"""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from run import junit_counts  # noqa: E402


def main():
    models = os.environ.setdefault("DS4_STAGE_MODELS", "/tmp/ds4-stages")
    os.makedirs(models, exist_ok=True)
    print("== stage tests (build/cuda/test_stages)", flush=True)
    p = subprocess.run([os.path.join(ROOT, "build/cuda/test_stages"), models], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    sys.stdout.write(p.stdout)
    m = re.search(r"^(\d+) passed, (\d+) failed$", p.stdout, re.M)
    sp, sf = (int(m.group(1)), int(m.group(2))) if m else (0, 1)
    if not m:
        print("test_stages did not finish (exit %d)" % p.returncode)
    # the small-model tests on several pytest workers where pytest-xdist is there (the GPU takes several
    # small processes at once; DS4_CUDA_TEST_JOBS, default 4), the full-shape ones (80 GB each) alone
    jobs = int(os.environ.get("DS4_CUDA_TEST_JOBS", "4"))
    try:
        import xdist  # noqa: F401
    except ImportError:
        jobs = 1
    print("== pytest tests/cuda (%s)" % ("%d workers" % jobs if jobs > 1 else "one process"), flush=True)
    pp = pf = ps = 0
    for i, (files, par) in enumerate([(["test_cuda.py"], jobs > 1), (["test_full_shape.py"], False)]):
        junit = os.path.join(ROOT, "build", "pytest-cuda-%d.xml" % i)
        if os.path.exists(junit):
            os.remove(junit)
        cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-rfEs", "-p", "no:cacheprovider", "--durations=12",
               "--junitxml", junit] + (["-n", str(jobs)] if par else []) + \
              [os.path.join(ROOT, "tests/cuda", f) for f in files] + sys.argv[1:]
        r = subprocess.run(cmd, cwd=ROOT)
        if os.path.exists(junit):
            a, b, c = junit_counts(junit)
            pp, pf, ps = pp + a, pf + b, ps + c
        elif r.returncode != 0:
            pf += 1
    print("stages: %d passed, %d failed; pytest: %d passed, %d failed, %d skipped" % (sp, sf, pp, pf, ps))
    print("%d passed, %d failed" % (sp + pp, sf + pf))
    return 1 if sf + pf or sp + pp == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
