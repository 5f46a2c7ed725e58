"""ds4-bench on the demo model, CPU backend: the table, the CSV and the
--profile breakdowns (one decode step and one prefill chunk per frontier)
are complete and consistent; bad options are refused with a message.

Timings are never asserted (they depend on the machine); structure is:
every frontier has a CSV row with positive rates, each profile lists the
engine's stages with shares that add up to 100%.
"""
import csv
import os
import re
import subprocess

import pytest

from conftest import ROOT

BENCH = str(ROOT / "ds4-bench")
MODEL = os.environ.get("DS4_TEST_MODEL") or str(ROOT / "build" / "demo.gguf")
STAGES = {"embed", "hc_pre", "attn_project", "compress", "indexer", "attention", "kv_store", "hc_post", "moe_route",
          "moe_experts", "head", "link"}


@pytest.fixture(scope="module")
def model():
    if not os.path.exists(BENCH):
        pytest.fail("ds4-bench is not built (run make)")
    if not os.path.exists(MODEL):
        r = subprocess.run(["make", "-s", "demo-model"], cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0 or not os.path.exists(MODEL):
            pytest.skip("demo model not available (make demo-model failed): " + r.stderr[-300:])
    return MODEL


def profiles(out):
    """{(kind, frontier): {stage: (ms, pct, amount)}} from the --profile blocks; amount: MB read per token
    (decode) or GFLOP per token (prefill)."""
    res, cur = {}, None
    for line in out.splitlines():
        m = re.match(r"  per-stage time of one decode step at (\d+) ", line)
        p = re.match(r"  per-stage time of a (\d+)-token prefill chunk ending at (\d+) ", line)
        if m or p:
            cur = res.setdefault(("decode", int(m.group(1))) if m else ("prefill", int(p.group(2))), {})
            continue
        s = re.match(r"    (\w+)\s+([0-9.]+) ms\s+([0-9.]+)%.*?([0-9.]+) (MB|GFLOP) ", line)
        if s and cur is not None:
            cur[s.group(1)] = (float(s.group(2)), float(s.group(3)), float(s.group(4)))
        elif not line.startswith("    "):
            cur = None
    return res


def test_bench_table_csv_and_profiles(model, tmp_path):
    out_csv = tmp_path / "b.csv"
    r = subprocess.run([BENCH, "-m", model, "--cpu", "-t", "2", "--ctx-start", "64", "--ctx-max", "128",
                        "--gen-tokens", "2", "--prefill-chunk", "32", "--profile", "--csv", str(out_csv)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(out_csv.open()))
    assert [int(x["ctx_tokens"]) for x in rows] == [64, 128]
    for x in rows:
        assert float(x["prefill_tps"]) > 0 and float(x["gen_tps"]) > 0 and x["backend"] == "cpu"
        assert int(x["prefill_tokens"]) == 64
    prof = profiles(r.stdout)
    assert set(prof) == {("decode", 64), ("decode", 128), ("prefill", 64), ("prefill", 128)}, r.stdout
    for key, st in prof.items():
        assert set(st) <= STAGES and {"attention", "moe_experts", "head"} <= set(st), (key, st)
        assert all(ms >= 0 and amount >= 0 for ms, _, amount in st.values())
        assert abs(sum(pct for _, pct, _ in st.values()) - 100.0) < 1.0, (key, st)
        # every stage next to what it moves (decode: MB read) or computes (prefill: GFLOP)
        assert st["moe_experts"][2] > 0 and st["attention"][2] > 0, (key, st)
    # the decode stages' bytes add up to the bytes per token of the CSV row (the roofline's numerator)
    for x in rows:
        st = prof[("decode", int(x["ctx_tokens"]))]
        total = (float(x["weight_bytes_per_token"]) + float(x["kv_bytes_per_token"])) / 1e6
        got = sum(amount for _, _, amount in st.values())
        assert abs(got - total) <= 0.01 * total + 0.1 * len(st), (got, total, st)
    # the prefill chunk is --prefill-chunk tokens (at most the frontier)
    assert re.search(r"per-stage time of a 32-token prefill chunk ending at 128 ", r.stdout)


@pytest.mark.parametrize("args,needle", [
    (["--bogus"], "unknown"),
    (["--synthetic", "q7"], "q7"),
    (["--synthetic", "q2:0"], "q2:0"),
    (["--synthetic", "q2:44"], "q2:44"),
    (["--synthetic", "q4:3x"], "q4:3x"),
    (["-m", "/nonexistent/model.gguf", "--cpu"], "nonexistent"),
    (["--synthetic", "q2", "--ctx-start", "256", "--ctx-max", "64"], "below --ctx-start"),
    (["--synthetic", "q2", "--mtp-accept", "0.5"], "needs --mtp"),
    (["--synthetic", "q2", "--seed", ""], "--seed"),
    (["--synthetic", "q2", "--ctx-start", "+64"], "--ctx-start"),
    (["--synthetic", "q2", "--ctx-start", "4194304"], "1..1048576"),  # beyond the model: ran a 4M-token prefill
    (["--synthetic", "q2", "--ctx-max", "2097152"], "1..1048576"),
    (["--synthetic", "q2", "--step-mul", "0x2"], "--step-mul"),
    (["--synthetic", "q2", "--mtp", "synthetic", "--mtp-accept", "0.5,0x1p-1"], "--mtp-accept"),
    (["--synthetic", "q2", "--mtp", "synthetic", "--mtp-accept", "1,1,1,1,1"], "--mtp-accept"),
])
def test_bench_bad_options(args, needle):
    if not os.path.exists(BENCH):
        pytest.fail("ds4-bench is not built (run make)")
    r = subprocess.run([BENCH] + args, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert needle in (r.stderr + r.stdout)


def test_bench_synthetic_block_count(tmp_path):
    """--synthetic q2:1: the published shapes with only the first block (a benchmark that fits a smaller GPU);
    the table reads a model of one block (its bytes per token far below the 43-block model's 9.56 GB), and the
    device line after the session's reservation is printed."""
    if not os.path.exists(BENCH):
        pytest.fail("ds4-bench is not built (run make)")
    out = tmp_path / "b.csv"
    r = subprocess.run([BENCH, "--cpu", "-t", "2", "--synthetic", "q2:1", "--ctx-start", "16", "--ctx-max", "16",
                        "--gen-tokens", "1", "--prefill-chunk", "16", "--csv", str(out)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "ds4-bench: q2:1 model" in r.stdout and "session of 25 positions reserved" in r.stdout, r.stdout
    row = list(csv.DictReader(out.open()))[0]
    wb = int(row["weight_bytes_per_token"])
    assert 0.4e9 < wb < 2.0e9, wb  # embedding row + one block's dense and 6 + 1 experts + the 0.53 GB head


def test_bench_over_a_layer_split(model, tmp_path):
    """--split on the CPU backend: the same table and CSV; the profile names the hand-over between the parts
    ("link", the HC states of every token sent once per part boundary) beside the stages, and the bytes per
    token of the roofline stay the model's (link bytes are sent, not read)."""
    one_csv, split_csv = tmp_path / "one.csv", tmp_path / "split.csv"
    base = [BENCH, "-m", model, "--cpu", "-t", "2", "--ctx-start", "64", "--ctx-max", "64", "--gen-tokens", "2",
            "--prefill-chunk", "32"]
    r1 = subprocess.run(base + ["--csv", str(one_csv)], capture_output=True, text=True, timeout=600)
    r2 = subprocess.run(base + ["--split", "1,2,3", "--profile", "--csv", str(split_csv)], capture_output=True,
                        text=True, timeout=600)
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    a, b = list(csv.DictReader(one_csv.open())), list(csv.DictReader(split_csv.open()))
    assert len(a) == len(b) == 1
    for k in ("weight_bytes_per_token", "kv_bytes_per_token", "kvcache_bytes", "prefill_tokens"):
        assert a[0][k] == b[0][k], (k, a[0][k], b[0][k])
    assert "part 0 (blocks 0-0)" in r2.stdout and "part 2 (blocks 3-5)" in r2.stdout, r2.stdout[:2000]
    prof = profiles(r2.stdout)
    st = prof[("prefill", 64)]
    assert "link" in st and st["link"][0] > 0, st
    assert abs(sum(pct for _, pct, _ in st.values()) - 100.0) < 1.0, st


def test_bench_lost_output_and_missing_prompt_file(model, tmp_path):
    """A --csv that is not a regular file (/dev/full) or a --prompt-file that cannot be read is refused before the
    model loads (exit 2, naming it; no false 'out of memory'); a --csv write that fails (a file-size limit: the
    process was killed by SIGXFSZ and had already emptied the old file) is exit 1 naming it, and an earlier CSV
    under that name is kept whole; a lost stdout table is exit 1 (it was 0)."""
    import resource
    args = [BENCH, "-m", model, "--cpu", "--ctx-start", "64", "--ctx-max", "64", "--gen-tokens", "2",
            "--prefill-chunk", "64"]
    r = subprocess.run(args + ["--csv", "/dev/full"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "/dev/full" in r.stderr and "not a regular file" in r.stderr, r.stderr
    old = tmp_path / "old.csv"
    old.write_text("OLD\n")
    r = subprocess.run(args + ["--csv", str(old)], capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)))
    assert r.returncode == 1 and "file too large writing" in r.stderr and str(old) in r.stderr, r.stderr
    assert old.read_text() == "OLD\n" and sorted(p.name for p in tmp_path.iterdir()) == ["old.csv"]
    with open("/dev/full", "w") as full:
        r = subprocess.run(args, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert r.returncode == 1 and "writing the output failed" in r.stderr, r.stderr
    for bad in (tmp_path / "none.txt", tmp_path, "/dev/null"):
        r = subprocess.run(args + ["--prompt-file", str(bad)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "--prompt-file" in r.stderr and "out of memory" not in r.stderr, r.stderr
        assert "model, backend" not in r.stdout, r.stdout  # before the model loads (its first line)


def test_bench_csv_never_overwrites_an_input(model, tmp_path):
    """--csv naming the model or the prompt file replaced it with the CSV (exit 0: the model became 442 bytes);
    refused with exit 2 before the model loads, the files intact."""
    import shutil
    m = tmp_path / "m.gguf"
    shutil.copy(model, m)
    p = tmp_path / "p.txt"
    p.write_text("a prompt of a few words " * 8)
    before = m.read_bytes()
    base = [BENCH, "-m", str(m), "--cpu", "--ctx-start", "64", "--ctx-max", "64", "--gen-tokens", "2"]
    for target, name in ((m, "-m"), (p, "--prompt-file")):
        r = subprocess.run(base + ["--prompt-file", str(p), "--csv", str(target)], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 2 and "is the %s file" % name in r.stderr, r.stderr
    assert m.read_bytes() == before and p.read_text() == "a prompt of a few words " * 8


def test_bench_default_text_from_any_directory(model, tmp_path):
    """Run from another directory the default prompt (tests/data/promessi_sposi.txt, relative) was not found
    and random token ids were used without a word (they route the experts otherwise); the text beside the
    program is used now, and a fallback to random ids says so."""
    args = [BENCH, "-m", model, "--cpu", "--ctx-start", "64", "--ctx-max", "64", "--gen-tokens", "2"]
    r = subprocess.run(args + ["--csv", str(tmp_path / "a.csv")], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0 and "random token ids" not in r.stderr, r.stderr
    here = subprocess.run(args + ["--csv", str(tmp_path / "b.csv")], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert here.returncode == 0 and "random token ids" not in here.stderr, here.stderr
    # a model without a tokenizer has no text to use: said
    syn = subprocess.run([BENCH, "--synthetic", "q2:1", "--cpu", "--ctx-start", "8", "--ctx-max", "8",
                          "--gen-tokens", "1", "--csv", str(tmp_path / "c.csv")], capture_output=True, text=True,
                         timeout=600)
    assert syn.returncode == 0 and "random token ids" in syn.stderr, syn.stderr
