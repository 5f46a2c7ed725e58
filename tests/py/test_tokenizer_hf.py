"""ds4's tokenizer against Hugging Face `tokenizers` on the official tokenizer.json.

Our side runs the real programs: `ds4-convert --vocab-only --tokenizer` writes
tok.gguf, and `ds4 -m tok.gguf --dump-tokens --prompt-file F` tokenizes (rendered
mode: the seven markers of docs/TEXT.md A.1 are recognized, everything else is plain
BPE). The reference ids are computed here, in the test run, by HF `tokenizers`:

* plain: the tokenizer.json with no added tokens (pre-tokenizer + BPE only),
  used for texts that contain none of the seven markers (there ds4's rendered
  mode is its plain mode);
* rendered: the tokenizer.json whose added tokens are exactly the seven
  markers, with the ids our GGUF gives them (V3 lacks <think>, </think>,
  ｜DSML｜; the converter adds them as V4 has them, docs/TEXT.md A.8/A.9).

Many texts go through one ds4 run: they are joined with the BOS marker, which
both sides treat as a hard boundary (spans between markers are tokenized
independently), and the result is cut again at the BOS ids. Every text is also
checked for an exact round trip (bytes of the decoded ids == the input bytes),
with a byte decoder written here from docs/TEXT.md A.3/A.7.
"""
import json
import os
import random
import subprocess
import unicodedata

import pytest
from tokenizers import Tokenizer

from conftest import ROOT, data_path, prog

TOKENIZER_JSON = data_path("deepseek-v3-tokenizer.json")
CORPUS = data_path("tok-corpus")

BOS = "<｜begin▁of▁sentence｜>"
MARKERS = [BOS, "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
           "<think>", "</think>", "｜DSML｜"]

STATS = {"texts": 0, "ids": 0}


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def tok_gguf(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok.gguf"
    subprocess.run([prog("ds4-convert"), "--vocab-only", "--tokenizer", str(TOKENIZER_JSON),
                    "-o", str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def vocab(tok_gguf):
    """Token strings of tok.gguf, read with gguf-py."""
    from gguf import GGUFReader
    f = GGUFReader(str(tok_gguf)).fields["tokenizer.ggml.tokens"]
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def _byte_decoder():
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    dec, k = {}, 0
    for b in range(256):
        if b in keep:
            dec[chr(b)] = b
        else:
            dec[chr(0x100 + k)] = b
            k += 1
    return dec


BYTE_DEC = _byte_decoder()


def decode(vocab, ids):
    """Bytes of ids per docs/TEXT.md A.7 (markers verbatim, else byte symbols)."""
    out = bytearray()
    for i in ids:
        s = vocab[i]
        if "｜" in s:
            out += s.encode("utf-8")
        else:
            out += bytes(BYTE_DEC[c] for c in s if c in BYTE_DEC)
    return bytes(out)


@pytest.fixture(scope="module")
def hf(vocab):
    """(plain, rendered) HF tokenizers built from the official tokenizer.json."""
    d = json.loads(TOKENIZER_JSON.read_text(encoding="utf-8"))
    d["added_tokens"] = []
    plain = Tokenizer.from_str(json.dumps(d))
    d["added_tokens"] = [{"id": vocab.index(m), "content": m, "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False,
                          "special": True} for m in MARKERS]
    rendered = Tokenizer.from_str(json.dumps(d))
    return plain, rendered


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    # printed past pytest's output capture, so `make test` shows it
    cm = request.config.pluginmanager.get_plugin("capturemanager")
    with cm.global_and_fixture_disabled():
        print("\ntokenizer vs HF tokenizers: %d texts, %d ids compared, all identical"
              % (STATS["texts"], STATS["ids"]))


# ------------------------------------------------------------------ running ds4

def ds4_tokens(tok_gguf, vocab, tmp_path, data: bytes):
    """ids from `ds4 --dump-tokens`, with its per-token lines checked."""
    f = tmp_path / "prompt.txt"
    f.write_bytes(data)
    p = subprocess.run([prog("ds4"), "-m", str(tok_gguf), "--dump-tokens", "--prompt-file",
                        str(f)], capture_output=True, check=True)
    lines = p.stdout.decode("utf-8").split("\n")
    ids = json.loads(lines[0])
    # one line per token: id right-aligned in 6 columns, two spaces, the string
    body = p.stdout.decode("utf-8")[len(lines[0]) + 1:]
    want = "".join("%6d  %s\n" % (i, vocab[i]) for i in ids)
    assert body == want, "per-token lines of --dump-tokens differ from the vocabulary"
    return ids


def compare_plain(tok_gguf, vocab, hf, tmp_path, texts):
    """Texts without markers: ours (one run, BOS-joined) vs HF plain, each text."""
    plain, _ = hf
    bos_id = vocab.index(BOS)
    for t in texts:
        assert not any(m in t for m in MARKERS)
    joined = BOS + BOS.join(texts) + BOS
    ours = ds4_tokens(tok_gguf, vocab, tmp_path, joined.encode("utf-8"))
    assert ours[0] == bos_id and ours[-1] == bos_id
    cuts = [i for i, x in enumerate(ours) if x == bos_id]
    assert len(cuts) == len(texts) + 1
    for k, t in enumerate(texts):
        got = ours[cuts[k] + 1:cuts[k + 1]]
        want = plain.encode(t, add_special_tokens=False).ids
        if got != want:
            n = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]),
                     min(len(got), len(want)))
            pytest.fail("text %d (%r...) differs at id %d: ours %r, HF %r"
                        % (k, t[:80], n, got[n:n + 8], want[n:n + 8]))
        assert decode(vocab, got) == t.encode("utf-8"), "round trip of text %d" % k
        STATS["texts"] += 1
        STATS["ids"] += len(got)


# ------------------------------------------------------------------ corpora

def corpus_files():
    out = []
    for name in sorted(os.listdir(CORPUS)):
        out.append((CORPUS / name).read_text(encoding="utf-8"))
    return out


def promessi():
    return data_path("promessi_sposi.txt").read_text(encoding="utf-8")


DIGITS = {
    "ascii": "0123456789", "arabic_indic": "٠١٢٣٤٥٦٧٨٩", "ext_arabic": "۰۱۲۳۴۵۶۷۸۹",
    "devanagari": "०१२३४५६७८९", "thai": "๐๑๒๓๔๕๖๗๘๙", "fullwidth": "０１２３４５６７８９",
    "bengali": "০১২৩৪৫৬৭৮৯", "math_bold": "𝟎𝟏𝟐𝟑𝟒𝟓𝟔𝟕𝟖𝟗", "superscript": "⁰¹²³⁴⁵⁶⁷⁸⁹",
    "circled": "⓪①②③④⑤⑥⑦⑧⑨", "roman": "ⅠⅡⅢⅣⅤⅥⅦⅧⅨⅩ", "fractions": "½⅓⅔¼¾⅛",
}

WS = [" ", "  ", "\t", "\n", "\r\n", "\r", "\n\n", "\u00a0", "\u3000", "\u2003", "\u2009",
      "\x0b", "\x0c", "\x85", "\u2028", "\u2029", "\u200b", "\ufeff", " \n ", "\t\t\n"]


def number_texts(rng):
    out = []
    for name, ds in DIGITS.items():
        for n in range(1, 41):
            num = "".join(rng.choice(ds) for _ in range(n))
            out.append(num)
            out.append("x" + num + "y " + num + ", " + num + ".5")
            out.append(" " * rng.randint(1, 4) + num + "\n")
    out += ["3.14159", "1,000,000", "-42", "+7e-10", "0x1F", "1_000", "v1.2.3", "2024-01-31",
            "12:34:56", "$1,299.99", "€12", "50%", "#1", "A1B2C3", "٣.١٤", "１,２３４円"]
    return out


def whitespace_texts(rng):
    words = ["word", "é", "中文", "1", "!", ".", "«", "x", "", "ab cd", "😀", "\u0301"]
    out = []
    for _ in range(400):
        parts = []
        for _ in range(rng.randint(1, 8)):
            parts.append("".join(rng.choice(WS) for _ in range(rng.randint(0, 5))))
            parts.append(rng.choice(words))
        out.append("".join(parts))
    out += [w * n for w in WS for n in (1, 2, 3, 7)]
    out += ["trailing   ", "trailing\n\n", "\n\nleading", "a\r\nb\r\n\r\nc", "  \t \n  x"]
    return out


# code point pools for the fuzz strings
def _pool(ranges):
    return [chr(c) for a, b in ranges for c in range(a, b + 1) if not 0xD800 <= c <= 0xDFFF]


POOLS = [
    _pool([(0x20, 0x7E)]),                                     # ASCII
    _pool([(0x00, 0x20), (0x7F, 0xA0)]),                       # controls, NBSP
    _pool([(0xA1, 0x24F)]),                                    # Latin-1, Latin ext
    _pool([(0x300, 0x36F), (0x1AB0, 0x1AFF), (0x20D0, 0x20FF)]),  # combining marks
    _pool([(0x370, 0x52F), (0x590, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F)]),
    _pool([(0x2000, 0x206F), (0x2100, 0x23FF), (0x3000, 0x303F)]),  # punct, symbols
    _pool([(0x3040, 0x30FF), (0x4E00, 0x4E80), (0x9F90, 0x9FFF), (0xAC00, 0xAC40)]),
    _pool([(0xFF00, 0xFFEF)]),                                 # fullwidth/halfwidth
    _pool([(0x1F300, 0x1F64F), (0x1F900, 0x1F9FF), (0x1F1E6, 0x1F1FF)]) + ["\u200d", "\ufe0f"],
]


def random_cp(rng):
    while True:
        c = rng.randrange(0x110000)
        if not 0xD800 <= c <= 0xDFFF:
            return chr(c)


def fuzz_texts(rng, n):
    out = []
    for _ in range(n):
        k = rng.randint(1, 120)
        pools = rng.sample(POOLS, rng.randint(1, 3))
        s = []
        for _ in range(k):
            r = rng.random()
            s.append(random_cp(rng) if r < 0.1 else rng.choice(rng.choice(pools)))
        out.append("".join(s))
    return out


def all_codepoint_texts(keep):
    """Code points c with keep(c), each in contexts that exercise every branch
    of the split regexes, 512 code points per text."""
    out, buf = [], []
    for c in range(0x110000):
        if 0xD800 <= c <= 0xDFFF or not keep(c):
            continue
        ch = chr(c)
        buf.append("a" + ch + "b " + ch + ch + " 1" + ch + "\n" + ch + "." + ch)
        if len(buf) == 512:
            out.append("".join(buf))
            buf = []
    if buf:
        out.append("".join(buf))
    return [t for t in out if not any(m in t for m in MARKERS)]


# ------------------------------------------------------------------ tests

def test_tokenizer_hf_corpus_files_and_promessi(tok_gguf, vocab, hf, tmp_path):
    compare_plain(tok_gguf, vocab, hf, tmp_path, corpus_files() + [promessi()])


def test_tokenizer_hf_promessi_slices(tok_gguf, vocab, hf, tmp_path):
    rng = random.Random(1)
    text = promessi()
    slices = []
    for _ in range(300):
        a = rng.randrange(len(text))
        slices.append(text[a:a + rng.choice([1, 2, 5, 17, 100, 1000, 4000])])
    compare_plain(tok_gguf, vocab, hf, tmp_path, [s for s in slices if s])


def test_tokenizer_hf_numbers_every_script(tok_gguf, vocab, hf, tmp_path):
    compare_plain(tok_gguf, vocab, hf, tmp_path, number_texts(random.Random(2)))


def test_tokenizer_hf_whitespace_and_line_endings(tok_gguf, vocab, hf, tmp_path):
    compare_plain(tok_gguf, vocab, hf, tmp_path, whitespace_texts(random.Random(3)))


def test_tokenizer_hf_unicode_fuzz(tok_gguf, vocab, hf, tmp_path):
    compare_plain(tok_gguf, vocab, hf, tmp_path, fuzz_texts(random.Random(4), 1500))


def test_tokenizer_hf_every_codepoint_class(tok_gguf, vocab, hf, tmp_path):
    # every code point of the BMP, every 9th above it (the full range was
    # checked once: dev/gen_pretok_unicode.py probes all code points)
    texts = all_codepoint_texts(lambda c: c < 0x10000 or c % 9 == 0)
    compare_plain(tok_gguf, vocab, hf, tmp_path, texts)


def test_tokenizer_hf_added_token_strings_as_text(tok_gguf, vocab, hf, tmp_path):
    # other added tokens of the vocabulary are ordinary text in ds4 (docs/TEXT.md A.2)
    others = ["<｜tool▁calls▁begin｜>", "<｜tool▁sep｜>", "<|EOT|>", "<｜place▁holder▁no▁5｜>",
              "<｜fim▁hole｜>", "<｜▁pad▁｜>", "<think", "think>", "<｜User", "User｜>", "｜DSML",
              "DSML｜", "< think>", "</ think>", "<THINK>", "<｜user｜>", "｜", "▁", "<｜｜>"]
    texts = [o for o in others] + ["x" + o + " y\n" + o + o for o in others]
    # ("｜DSML" twice makes the marker "｜DSML｜": those go to the rendered test)
    texts = [t for t in texts if not any(m in t for m in MARKERS)]
    compare_plain(tok_gguf, vocab, hf, tmp_path, texts)


def test_tokenizer_hf_rendered_markers(tok_gguf, vocab, hf, tmp_path):
    _, rendered = hf
    rng = random.Random(5)
    pieces = MARKERS + ["Hello", " world", "\n\n", " ", "中文", "123", "«x»", "<", ">", "｜",
                        "tool_calls>", "\n<", "</", "DSML", " 😀", "\t"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))) for _ in range(300)]
    texts += [
        "<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜></think>",
        "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"bash\">\n</｜DSML｜invoke>",
        "<think><think>x</think></think>", "<<think>>", "｜DSML｜｜DSML｜", "<｜User｜ >",
    ]
    # one ds4 run for all texts; the joined text is itself a rendered-mode text
    joined = BOS.join(texts)
    ours = ds4_tokens(tok_gguf, vocab, tmp_path, joined.encode("utf-8"))
    # HF numbers added tokens absent from model.vocab itself (from 128000 up,
    # ignoring their "id"): map its marker ids to ours by string
    to_ours = {rendered.token_to_id(m): vocab.index(m) for m in MARKERS}
    want = [to_ours.get(i, i) for i in rendered.encode(joined, add_special_tokens=False).ids]
    assert sum(1 for i in want if i in to_ours.values()) > 300
    assert ours == want
    assert decode(vocab, ours) == joined.encode("utf-8")
    STATS["texts"] += len(texts)
    STATS["ids"] += len(ours)


def test_tokenizer_invalid_utf8_round_trip(tok_gguf, vocab, tmp_path):
    # HF only takes str; ours accepts any bytes and must give them back exactly
    rng = random.Random(6)
    samples = [b"x\x80y", b"\xff\xfe", b"caf\xc3", b"\xe4\xb8 \xe4\xb8\xad",
               b"\xed\xa0\x80 surrogate", b"\xf4\x90\x80\x80", b"\xc0\xaf overlong", b"\x00\x01\x02"]
    samples += [bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))) for _ in range(200)]
    for s in samples:
        assert BOS.encode() not in s
    sep = BOS.encode("utf-8")
    joined = sep + sep.join(samples) + sep
    ours = ds4_tokens(tok_gguf, vocab, tmp_path, joined)
    assert decode(vocab, ours) == joined
