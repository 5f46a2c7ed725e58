/* gguf.h - GGUF version 3 reader and writer (docs/FORMATS.md section A).
 *
 * Knows nothing about DeepSeek: it reads and writes the container only.
 *
 * Reader: ds4_gguf_open() maps a file read-only (ds4_gguf_open_memory() reads
 * a caller buffer) and validates the whole header before returning: magic,
 * version, counts and string lengths bounded by the file size, value types,
 * BOOL bytes, unique keys and tensor names, general.alignment, tensor dims,
 * types, sizes (overflow-checked), offsets (aligned, inside the data
 * section) and overlap. Every error names the problem, the byte offset and
 * the key or tensor. After a successful open every accessor below is total:
 * no accessor can read outside the mapping. A ds4_gguf is immutable after
 * open, so concurrent readers on one handle are safe. (As with any mmap, a
 * file truncated by another process while mapped faults on access: do not
 * rewrite a GGUF in place while it is open; our writer renames a new file.)
 *
 * Strings in the mapping are not NUL-terminated: they come back as
 * ds4_gguf_str {ptr, len}. Keys and tensor names are exceptions: the reader
 * keeps NUL-terminated copies (keys and names never contain a NUL byte).
 *
 * Multi-byte values inside the mapping (array elements, tensor data) are
 * little-endian and may be unaligned: read them with memcpy.
 *
 * Writer: collects key/values and tensor descriptions in insertion order and
 * writes a file packed in directory order with alignment padding (A.5, A.6),
 * through a temporary file in the same directory that is fsync'ed and
 * renamed, so a crash never leaves a half-written file under the final name.
 * Tensor bytes are either referenced (caller memory, not copied) or produced
 * by a callback at write time (streaming, for tensors too big to hold).
 */
#ifndef DS4_GGUF_H
#define DS4_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util/err.h"

/* ---------------------------------------------------------------- types */

/* Metadata value types (A.3). */
enum ds4_gguf_vtype {
    DS4_GGUF_U8 = 0,
    DS4_GGUF_I8 = 1,
    DS4_GGUF_U16 = 2,
    DS4_GGUF_I16 = 3,
    DS4_GGUF_U32 = 4,
    DS4_GGUF_I32 = 5,
    DS4_GGUF_F32 = 6,
    DS4_GGUF_BOOL = 7,
    DS4_GGUF_STR = 8,
    DS4_GGUF_ARR = 9,
    DS4_GGUF_U64 = 10,
    DS4_GGUF_I64 = 11,
    DS4_GGUF_F64 = 12,
    DS4_GGUF_N_VTYPES = 13,
};

/* ggml tensor type ids (docs/FORMATS.md B.0). Ids not listed are retired. */
enum ds4_ggml_type {
    DS4_GGML_F32 = 0,
    DS4_GGML_F16 = 1,
    DS4_GGML_Q4_0 = 2,
    DS4_GGML_Q4_1 = 3,
    DS4_GGML_Q5_0 = 6,
    DS4_GGML_Q5_1 = 7,
    DS4_GGML_Q8_0 = 8,
    DS4_GGML_Q8_1 = 9,
    DS4_GGML_Q2_K = 10,
    DS4_GGML_Q3_K = 11,
    DS4_GGML_Q4_K = 12,
    DS4_GGML_Q5_K = 13,
    DS4_GGML_Q6_K = 14,
    DS4_GGML_Q8_K = 15,
    DS4_GGML_IQ2_XXS = 16,
    DS4_GGML_IQ2_XS = 17,
    DS4_GGML_IQ3_XXS = 18,
    DS4_GGML_IQ1_S = 19,
    DS4_GGML_IQ4_NL = 20,
    DS4_GGML_IQ3_S = 21,
    DS4_GGML_IQ2_S = 22,
    DS4_GGML_IQ4_XS = 23,
    DS4_GGML_I8 = 24,
    DS4_GGML_I16 = 25,
    DS4_GGML_I32 = 26,
    DS4_GGML_I64 = 27,
    DS4_GGML_F64 = 28,
    DS4_GGML_IQ1_M = 29,
    DS4_GGML_BF16 = 30,
    DS4_GGML_TQ1_0 = 34,
    DS4_GGML_TQ2_0 = 35,
    DS4_GGML_MXFP4 = 39,
    DS4_GGML_NVFP4 = 40,
    DS4_GGML_Q1_0 = 41,
};

/* Storage geometry of one ggml type: a row of ne[0] values is
 * ne[0]/block_elems blocks of block_bytes each. */
typedef struct ds4_ggml_type_info {
    const char *name;      /* "F32", "Q4_K", ... */
    uint32_t block_elems;  /* values per block (1 for plain types) */
    uint32_t block_bytes;  /* bytes per block */
} ds4_ggml_type_info;

/* Geometry of type id `type`, or NULL when the id is unknown or retired.
 * Returns a pointer to a static table; thread-safe. */
const ds4_ggml_type_info *ds4_ggml_type_get(uint32_t type);

/* Name of a ggml type id ("Q8_0"), or "?" when unknown. Thread-safe. */
const char *ds4_ggml_type_name(uint32_t type);

/* Name of a metadata value type ("UINT32", ... as gguf-py spells them), or
 * "?" when out of range. Thread-safe. */
const char *ds4_gguf_vtype_name(uint32_t vtype);

/* Byte size of a fixed-size value type (1..8), 0 for STR, ARR or unknown. */
size_t ds4_gguf_vtype_size(uint32_t vtype);

/* A string inside the mapping: len bytes at ptr, not NUL-terminated. */
typedef struct ds4_gguf_str {
    const char *ptr;
    uint64_t len;
} ds4_gguf_str;

/* Copies s into a fresh NUL-terminated malloc'ed string (caller frees), or
 * NULL when the allocation fails. Embedded NUL bytes are kept. */
char *ds4_gguf_str_dup(ds4_gguf_str s);

/* One decoded scalar or array element. Which member is set depends on
 * type: U8/U16/U32/U64/BOOL -> u64 (bool as 0/1); I8/I16/I32/I64 -> i64;
 * F32/F64 -> f64 (F32 converted exactly); STR -> str. */
typedef struct ds4_gguf_value {
    uint32_t type; /* enum ds4_gguf_vtype, never ARR */
    union {
        uint64_t u64;
        int64_t i64;
        double f64;
        ds4_gguf_str str;
    } v;
} ds4_gguf_value;

/* One tensor-info record, validated. */
typedef struct ds4_gguf_tensor {
    const char *name;    /* NUL-terminated, < 64 bytes, valid UTF-8; owned by the reader */
    uint32_t type;       /* enum ds4_ggml_type, known */
    uint32_t n_dims;     /* 1..4 */
    int64_t ne[4];       /* dims, ne[0] fastest; missing dims are 1; all >= 1 */
    int64_t n_elems;     /* ne[0]*ne[1]*ne[2]*ne[3] */
    uint64_t offset;     /* relative to the data section, multiple of the alignment */
    uint64_t n_bytes;    /* bytes of data */
    const void *data;    /* base + data_offset + offset: zero-copy view, read-only */
} ds4_gguf_tensor;

/* ---------------------------------------------------------------- reader */

typedef struct ds4_gguf ds4_gguf;

/* Maps `path` read-only and validates it (see the file comment). On success
 * *out owns the mapping; free with ds4_gguf_close(). On failure returns
 * DS4_E_IO (open/stat/mmap), DS4_E_FORMAT (bad content) or DS4_E_NOMEM, sets
 * *out = NULL and fills err with a message naming the problem and byte
 * offset. Thread-safe (no shared state). */
int ds4_gguf_open(ds4_gguf **out, const char *path, ds4_err *err);

/* Same validation over n bytes at data. The buffer is not copied: it must
 * stay valid and unchanged until ds4_gguf_close(). */
int ds4_gguf_open_memory(ds4_gguf **out, const void *data, size_t n, ds4_err *err);

/* Releases the handle (unmaps a file opened by ds4_gguf_open). NULL is ok.
 * Every pointer obtained from the handle becomes invalid. */
void ds4_gguf_close(ds4_gguf *g);

uint32_t ds4_gguf_alignment(const ds4_gguf *g);   /* general.alignment or 32 */
uint64_t ds4_gguf_data_offset(const ds4_gguf *g); /* absolute start of the data section */
uint64_t ds4_gguf_file_bytes(const ds4_gguf *g);  /* size of the file / buffer */
const void *ds4_gguf_base(const ds4_gguf *g);     /* first byte of the file */
/* True when the tensors follow the packed layout of A.5 (offset_0 = 0,
 * each next offset = previous end aligned up), as our writer produces. */
bool ds4_gguf_is_packed(const ds4_gguf *g);

/* --- metadata. kv indices run 0..n_kv-1 in file order. Accessors taking an
 * index require 0 <= kv < n_kv (checked by DS4_ASSERT). */

int64_t ds4_gguf_n_kv(const ds4_gguf *g);
/* Index of key, or -1 when absent. O(log n_kv). */
int64_t ds4_gguf_find_key(const ds4_gguf *g, const char *key);
const char *ds4_gguf_kv_key(const ds4_gguf *g, int64_t kv); /* NUL-terminated, owned by g */
uint32_t ds4_gguf_kv_type(const ds4_gguf *g, int64_t kv);   /* enum ds4_gguf_vtype */
/* Offset in the file of the kv record's first byte (its key length). */
uint64_t ds4_gguf_kv_file_offset(const ds4_gguf *g, int64_t kv);

/* Scalar value of kv (type != ARR). Returns 0, or DS4_E_ARG for an array. */
int ds4_gguf_kv_value(const ds4_gguf *g, int64_t kv, ds4_gguf_value *out);

/* Arrays: element type (never ARR: nested arrays are rejected at open) and
 * element count; both 0 when kv is not an array. */
uint32_t ds4_gguf_arr_type(const ds4_gguf *g, int64_t kv);
uint64_t ds4_gguf_arr_n(const ds4_gguf *g, int64_t kv);
/* Element i (< arr_n) of array kv. Returns 0, or DS4_E_ARG when kv is not an
 * array or i is out of range. O(1), also for string arrays. */
int ds4_gguf_arr_value(const ds4_gguf *g, int64_t kv, uint64_t i, ds4_gguf_value *out);
/* Raw little-endian elements of a numeric/bool array (arr_n * vtype_size
 * bytes, possibly unaligned), or NULL for string arrays and non-arrays. */
const void *ds4_gguf_arr_data(const ds4_gguf *g, int64_t kv);
/* Convenience forms of arr_value: numeric element as int64 (integers and
 * bools; U64 above INT64_MAX fails) or as double (any numeric type), string
 * element. Return 0 or DS4_E_ARG (wrong type, out of range). */
int ds4_gguf_arr_i64(const ds4_gguf *g, int64_t kv, uint64_t i, int64_t *out);
int ds4_gguf_arr_f64(const ds4_gguf *g, int64_t kv, uint64_t i, double *out);
int ds4_gguf_arr_str(const ds4_gguf *g, int64_t kv, uint64_t i, ds4_gguf_str *out);

/* Typed getters by key. The value type must match exactly (no widening).
 * Return 0, or DS4_E_MODEL with a message naming the key and the expected
 * and actual types ("key 'x' has type INT32, expected UINT32") or saying it
 * is missing. */
int ds4_gguf_get_u32(const ds4_gguf *g, const char *key, uint32_t *out, ds4_err *err);
int ds4_gguf_get_i32(const ds4_gguf *g, const char *key, int32_t *out, ds4_err *err);
int ds4_gguf_get_u64(const ds4_gguf *g, const char *key, uint64_t *out, ds4_err *err);
int ds4_gguf_get_f32(const ds4_gguf *g, const char *key, float *out, ds4_err *err);
int ds4_gguf_get_bool(const ds4_gguf *g, const char *key, bool *out, ds4_err *err);
int ds4_gguf_get_str(const ds4_gguf *g, const char *key, ds4_gguf_str *out, ds4_err *err);
/* Array with element type elem_type: *kv_out = its index, *n_out = count. */
int ds4_gguf_get_arr(const ds4_gguf *g, const char *key, uint32_t elem_type,
                     int64_t *kv_out, uint64_t *n_out, ds4_err *err);

/* --- tensors, in file (directory) order. */

int64_t ds4_gguf_n_tensors(const ds4_gguf *g);
/* A name of the file's contents for comparing two copies: SHA-256 over the
 * header, metadata and tensor table and, of every tensor's data, up to
 * 4 KiB at its start, middle and end (a re-quantized or fine-tuned file with
 * the same metadata differs there; the whole data is not read). */
int ds4_gguf_identity(const ds4_gguf *g, uint8_t out[32]);
/* Tensor i (0 <= i < n_tensors, asserted); owned by g. */
const ds4_gguf_tensor *ds4_gguf_tensor_at(const ds4_gguf *g, int64_t i);
/* Index of the tensor named name, or -1. O(log n_tensors). */
int64_t ds4_gguf_find_tensor(const ds4_gguf *g, const char *name);

/* ---------------------------------------------------------------- writer */

typedef struct ds4_gguf_writer ds4_gguf_writer;
typedef struct ds4_gguf_sink ds4_gguf_sink;

/* Producer of one tensor's bytes, called once by the write functions, in
 * directory order. It must push exactly the tensor's n_bytes through
 * ds4_gguf_sink_write (in any number of pieces) and return 0, or return a
 * negative DS4_E* (filling err) to abort the write. */
typedef int (*ds4_gguf_produce_fn)(void *user, int64_t tensor_index,
                                   ds4_gguf_sink *sink, ds4_err *err);

/* Appends n bytes of the current tensor. Returns 0, DS4_E_IO (write failed;
 * a full disk is reported as such) or DS4_E_ARG (more than n_bytes). */
int ds4_gguf_sink_write(ds4_gguf_sink *sink, const void *data, size_t n, ds4_err *err);

/* A new empty writer (aborts only if a small allocation fails). Not
 * thread-safe: one thread builds and writes it. */
ds4_gguf_writer *ds4_gguf_writer_new(void);
void ds4_gguf_writer_free(ds4_gguf_writer *w);

/* Adding metadata. Keys are copied, must be non-empty printable ASCII
 * (0x21..0x7e), <= 65535 bytes, and unique. Values are copied. On a bad key
 * or a duplicate the call returns DS4_E_ARG; the first such error is also
 * kept and returned by the write functions, so callers may check only at
 * the end. The value "general.alignment" (U32, a power of two) sets the
 * alignment used when writing (default 32). */
int ds4_gguf_writer_add_u8(ds4_gguf_writer *w, const char *key, uint8_t v);
int ds4_gguf_writer_add_i8(ds4_gguf_writer *w, const char *key, int8_t v);
int ds4_gguf_writer_add_u16(ds4_gguf_writer *w, const char *key, uint16_t v);
int ds4_gguf_writer_add_i16(ds4_gguf_writer *w, const char *key, int16_t v);
int ds4_gguf_writer_add_u32(ds4_gguf_writer *w, const char *key, uint32_t v);
int ds4_gguf_writer_add_i32(ds4_gguf_writer *w, const char *key, int32_t v);
int ds4_gguf_writer_add_u64(ds4_gguf_writer *w, const char *key, uint64_t v);
int ds4_gguf_writer_add_i64(ds4_gguf_writer *w, const char *key, int64_t v);
int ds4_gguf_writer_add_f32(ds4_gguf_writer *w, const char *key, float v);
int ds4_gguf_writer_add_f64(ds4_gguf_writer *w, const char *key, double v);
int ds4_gguf_writer_add_bool(ds4_gguf_writer *w, const char *key, bool v);
/* String of len bytes (any bytes; UTF-8 expected by readers). */
int ds4_gguf_writer_add_str(ds4_gguf_writer *w, const char *key, const char *s, size_t len);
/* Array of n numeric or bool elements of elem_type, read from host memory
 * as a C array of that type (bool: one byte each, 0/1). */
int ds4_gguf_writer_add_arr(ds4_gguf_writer *w, const char *key, uint32_t elem_type,
                            const void *elems, uint64_t n);
/* Array of n strings; lens may be NULL (then strlen of each). */
int ds4_gguf_writer_add_arr_str(ds4_gguf_writer *w, const char *key,
                                const char *const *strs, const size_t *lens, uint64_t n);

/* Adding tensors. name: non-empty, < 64 bytes, valid UTF-8, unique; type
 * known; 1 <= n_dims <= 4; ne[i] >= 1; ne[0] a multiple of the type's block
 * size. add_tensor references data (n_bytes, must equal the computed size):
 * it is NOT copied and must stay valid until the last write call.
 * add_tensor_cb instead calls produce(user, index, ...) at write time.
 * Both return the tensor's index (>= 0) or DS4_E_ARG (kept, as for keys). */
int64_t ds4_gguf_writer_add_tensor(ds4_gguf_writer *w, const char *name, uint32_t type,
                                   uint32_t n_dims, const int64_t *ne,
                                   const void *data, uint64_t n_bytes);
int64_t ds4_gguf_writer_add_tensor_cb(ds4_gguf_writer *w, const char *name, uint32_t type,
                                      uint32_t n_dims, const int64_t *ne,
                                      ds4_gguf_produce_fn produce, void *user);

/* Writes the file: header, kvs, tensor infos, padding, then the tensors
 * packed in directory order, each followed by zero padding to the
 * alignment. Goes through "<path>.tmp.XXXXXX" in the same directory,
 * fsync'ed then renamed over path; on any failure the temporary file is
 * removed and path is untouched. Returns 0, DS4_E_ARG (an earlier add
 * failed), DS4_E_IO (message names the path, the byte offset and the cause;
 * "disk full" for ENOSPC) or the producer's error. */
int ds4_gguf_writer_write_file(ds4_gguf_writer *w, const char *path, ds4_err *err);

/* Same bytes into a fresh malloc'ed buffer (*out, *n_out; caller frees).
 * Returns 0, DS4_E_NOMEM, DS4_E_ARG or the producer's error. */
int ds4_gguf_writer_write_mem(ds4_gguf_writer *w, void **out, size_t *n_out, ds4_err *err);

/* Bytes the written file will have (known before writing); 0 after an add
 * error. */
uint64_t ds4_gguf_writer_file_bytes(const ds4_gguf_writer *w);

#endif
