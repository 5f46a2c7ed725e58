#!/usr/bin/env python3
"""Generates the malformed-GGUF corpus in tests/data/gguf-bad/.

Each case is a small file built byte by byte here (independently of our C
writer and of gguf-py), plus one line in MANIFEST.txt:

    <file name> TAB <fragment the reader's error message must contain>

tests/unit/test_gguf.c opens every file with ds4_gguf_open and checks the
fragment; tests/py/test_gguf_py.py runs ds4-gguf on each (exit 1, one line)
and checks that this script reproduces the committed files byte for byte.

Usage: make_bad_gguf.py [OUT_DIR]   (default: tests/data/gguf-bad)
"""
import os
import struct
import sys

# value type ids (docs/FORMATS.md A.3)
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
# ggml type ids used here
T_F32, T_Q8_0 = 0, 8


def s(b):
    """GGUF string: uint64 length + bytes."""
    if isinstance(b, str):
        b = b.encode()
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, payload):
    return s(key) + struct.pack("<I", vtype) + payload


def kv_u32(key, v):
    return kv(key, U32, struct.pack("<I", v))


def ti(name, dims, ttype, offset):
    out = s(name) + struct.pack("<I", len(dims))
    for d in dims:
        out += struct.pack("<Q", d)
    return out + struct.pack("<IQ", ttype, offset)


def header(n_t, n_kv, version=3, magic=b"GGUF"):
    return magic + struct.pack("<IQQ", version, n_t, n_kv)


def pad(b, a=32):
    return b + b"\0" * ((a - len(b) % a) % a)


def gguf(kvs=(), tis=(), data=b"", n_t=None, n_kv=None, align=32):
    """A file with the given records; counts default to the real ones."""
    body = header(len(tis) if n_t is None else n_t, len(kvs) if n_kv is None else n_kv)
    body += b"".join(kvs) + b"".join(tis)
    return pad(body, align) + data


GOOD_KV = kv_u32("test.value", 1)
F32_4 = ti("w", [4], T_F32, 0)  # 16 bytes at offset 0


def cases():
    c = {}
    c["empty"] = (b"", "smaller than the 24-byte GGUF header")
    c["short_header"] = (b"GGUF\x03\0\0\0\0\0", "smaller than the 24-byte GGUF header")
    c["bad_magic"] = (b"GGML" + gguf()[4:], "bad magic")
    c["version1"] = (header(0, 0, version=1) + b"\0" * 8, "GGUF v1 not supported")
    c["version2"] = (header(0, 0, version=2) + b"\0" * 8, "GGUF v2 not supported")
    c["big_endian"] = (b"GGUF" + struct.pack(">IQQ", 3, 0, 0) + b"\0" * 8, "byte-swapped/big-endian")
    c["version4"] = (header(0, 0, version=4) + b"\0" * 8, "unsupported GGUF version 4")
    c["huge_n_kv"] = (gguf(n_kv=1 << 60), "n_kv = 1152921504606846976 at byte 16 is implausible")
    c["huge_n_tensors"] = (gguf(n_t=(1 << 64) - 1), "n_tensors = 18446744073709551615 at byte 8 is implausible")
    c["key_len_huge"] = (header(0, 1) + struct.pack("<Q", 1 << 40) + b"abc" + b"\0" * 16,
                         "string length 1099511627776 exceeds")
    c["key_empty"] = (gguf([kv("", U8, b"\x01")]), "empty key")
    c["key_non_ascii"] = (gguf([kv("k\xe9y", U8, b"\x01")]), "keys are printable ASCII")
    c["key_with_nul"] = (gguf([kv(b"a\0b", U8, b"\x01")]), "keys are printable ASCII")
    c["value_type_unknown"] = (gguf([kv("k", 13, b"\0" * 8)]), "unknown value type 13")
    c["bool_byte_2"] = (gguf([kv("flag", BOOL, b"\x02")]), "BOOL byte is 2, must be 0 or 1")
    c["bool_array_byte"] = (gguf([kv("flags", ARR, struct.pack("<IQ", BOOL, 3) + b"\x00\x01\x07")]),
                            "BOOL array element 2")
    c["nested_array"] = (gguf([kv("n", ARR, struct.pack("<IQ", ARR, 1) + struct.pack("<IQ", U8, 1) + b"\1")]),
                         "nested arrays")
    c["array_elem_type_unknown"] = (gguf([kv("a", ARR, struct.pack("<IQ", 42, 1) + b"\0")]),
                                    "unknown array element type 42")
    c["array_count_huge"] = (gguf([kv("a", ARR, struct.pack("<IQ", U64, 1 << 61) + b"\0" * 8)]),
                             "array of 2305843009213693952 UINT64 elements")
    c["array_count_overflow"] = (gguf([kv("a", ARR, struct.pack("<IQ", U32, (1 << 64) - 1) + b"\0" * 8)]),
                                 "array of 18446744073709551615 UINT32 elements")
    c["str_array_count_huge"] = (gguf([kv("toks", ARR, struct.pack("<IQ", STR, 1 << 50) + s("a"))]),
                                 "array of 1125899906842624 strings cannot fit")
    c["str_array_elem_len_huge"] = (
        gguf([kv("toks", ARR, struct.pack("<IQ", STR, 2) + s("a") + struct.pack("<Q", 1 << 62) + b"xyz")]),
        "element 1 of array 'toks'")
    c["value_truncated"] = (header(0, 1) + s("k") + struct.pack("<I", U64) + b"\1\2", "truncated GGUF file at byte 37")
    c["string_value_truncated"] = (header(0, 1) + s("k") + struct.pack("<IQ", STR, 10) + b"abc",
                                   "string length 10 exceeds")
    c["duplicate_key"] = (gguf([kv_u32("a.b", 1), kv_u32("x", 2), kv_u32("a.b", 3)]), "duplicate key 'a.b'")
    c["alignment_u64"] = (gguf([kv("general.alignment", U64, struct.pack("<Q", 32))]),
                          "'general.alignment' at byte 24 has type UINT64, must be UINT32")
    c["alignment_zero"] = (gguf([kv_u32("general.alignment", 0)]), "0 is not a power of two")
    c["alignment_48"] = (gguf([kv_u32("general.alignment", 48)], align=48), "48 is not a power of two")
    c["tensor_name_empty"] = (gguf([], [ti("", [4], T_F32, 0)], b"\0" * 32), "empty name")
    c["tensor_name_64"] = (gguf([], [ti("n" * 64, [4], T_F32, 0)], b"\0" * 32), "is 64 bytes, must be < 64")
    c["tensor_name_bad_utf8"] = (gguf([], [ti(b"w\xc3\x28", [4], T_F32, 0)], b"\0" * 32), "not valid UTF-8")
    c["tensor_name_overlong_utf8"] = (gguf([], [ti(b"\xc0\xaf", [4], T_F32, 0)], b"\0" * 32), "not valid UTF-8")
    c["tensor_name_surrogate"] = (gguf([], [ti(b"\xed\xa0\x80", [4], T_F32, 0)], b"\0" * 32), "not valid UTF-8")
    c["tensor_name_nul"] = (gguf([], [ti(b"a\0b", [4], T_F32, 0)], b"\0" * 32), "not valid UTF-8")
    c["tensor_ndims_0"] = (gguf([], [ti("w", [], T_F32, 0)], b"\0" * 32), "n_dims is 0, must be 1..4")
    c["tensor_ndims_5"] = (gguf([], [ti("w", [1, 1, 1, 1, 4], T_F32, 0)], b"\0" * 32), "n_dims is 5, must be 1..4")
    c["tensor_ne_zero"] = (gguf([], [ti("w", [4, 0], T_F32, 0)], b"\0" * 32), "ne[1] = 0 is out of range")
    c["tensor_ne_negative"] = (gguf([], [ti("w", [1 << 63], T_F32, 0)], b"\0" * 32),
                               "ne[0] = 9223372036854775808 is out of range")
    c["tensor_elems_overflow"] = (gguf([], [ti("w", [1 << 32, 1 << 32], T_F32, 0)], b"\0" * 32),
                                  "element count overflows 64 bits")
    c["tensor_bytes_overflow"] = (gguf([], [ti("w", [1 << 62], T_F32, 0)], b"\0" * 32),
                                  "tensor 'w' (info at byte 24): byte size overflows 64 bits")
    c["tensor_type_retired"] = (gguf([], [ti("w", [4], 4, 0)], b"\0" * 32), "unknown ggml type id 4")
    c["tensor_type_unknown"] = (gguf([], [ti("w", [4], 1000, 0)], b"\0" * 32), "unknown ggml type id 1000")
    c["tensor_block_multiple"] = (gguf([], [ti("q", [31], T_Q8_0, 0)], b"\0" * 64),
                                  "tensor 'q' (info at byte 24): ne[0] = 31 is not a multiple of the Q8_0 block size 32")
    c["tensor_offset_misaligned"] = (gguf([], [ti("w", [4], T_F32, 16)], b"\0" * 64),
                                     "offset 16 is not a multiple of the alignment 32")
    c["tensor_past_end"] = (gguf([], [ti("w", [16], T_F32, 0)], b"\0" * 32), "runs past the end of the file")
    c["tensor_offset_huge"] = (gguf([], [ti("w", [4], T_F32, (1 << 64) - 32)], b"\0" * 32),
                               "runs past the end of the file")
    c["tensors_overlap"] = (gguf([], [ti("a", [16], T_F32, 0), ti("b", [4], T_F32, 32)], b"\0" * 64),
                            "tensors 'a' (offset 0, 64 bytes) and 'b' (offset 32) overlap")
    c["tensor_duplicate"] = (gguf([], [ti("w", [4], T_F32, 0), ti("w", [4], T_F32, 32)], b"\0" * 64),
                             "duplicate tensor name 'w'")
    body = header(1, 1) + GOOD_KV + F32_4
    c["data_section_missing"] = (body, "data section would start at byte 96")
    c["tensor_info_truncated"] = (header(1, 1) + GOOD_KV + F32_4[:-3], "truncated GGUF file at byte")
    # One kv record more than the declared count: the second record is then
    # read as a tensor info (name 'b', n_dims 4 = its type id) that runs out
    # of bytes in its dimensions.
    c["kv_count_too_small"] = (gguf([kv_u32("a", 1), kv_u32("b", 2)], n_kv=1, n_t=1),
                               "tensor 'b': truncated GGUF file at byte 62")
    c["not_gguf_text"] = (b"This is a plain text file, clearly not a GGUF model.\n", "bad magic")
    return c


def main():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "tests", "data", "gguf-bad")
    os.makedirs(out, exist_ok=True)
    lines = []
    for name, (data, frag) in sorted(cases().items()):
        assert frag, name
        fn = name + ".gguf"
        with open(os.path.join(out, fn), "wb") as f:
            f.write(data)
        lines.append("%s\t%s\n" % (fn, frag))
    with open(os.path.join(out, "MANIFEST.txt"), "w") as f:
        f.write("# file<TAB>fragment of the expected error (generated by tests/py/make_bad_gguf.py)\n")
        f.writelines(lines)


if __name__ == "__main__":
    main()
