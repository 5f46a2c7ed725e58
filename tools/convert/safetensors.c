/* safetensors.c - read-only view of a Hugging Face model directory's
 * *.safetensors files (docs/FORMATS.md E.2).
 *
 * Every file is mmap'ed read-only; tensors are zero-copy views into the
 * mappings, so a converter can stream a model far larger than RAM. The whole
 * header of each file is validated at open: header length inside the file,
 * JSON object of {name: {dtype, shape, data_offsets}}, known dtype, shape of
 * non-negative dims without overflow, end - begin == product(shape) * element
 * size, offsets inside the data area. With a model.safetensors.index.json,
 * only the shards it names are opened and every tensor it lists must exist in
 * its shard. Without one, every *.safetensors file of the directory is read.
 * A tensor name seen twice is an error. Nothing here is thread-unsafe after
 * open (the set is immutable).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "convert.h"
#include "util/file.h"

/* Largest JSON header accepted (the official checkpoint's largest shard
 * headers are well under 1 MiB). */
#define ST_MAX_HEADER (64u << 20)

static const struct { const char *name; int dtype; int size; } st_dtypes[] = {
    {"F32", DS4_ST_F32, 4},     {"F16", DS4_ST_F16, 2},         {"BF16", DS4_ST_BF16, 2},
    {"I64", DS4_ST_I64, 8},     {"I32", DS4_ST_I32, 4},         {"F64", DS4_ST_F64, 8},
    {"I8", DS4_ST_I8, 1},       {"U8", DS4_ST_U8, 1},           {"I16", DS4_ST_I16, 2},
    {"BOOL", DS4_ST_BOOL, 1},   {"F8_E4M3", DS4_ST_F8_E4M3, 1}, {"F8_E8M0", DS4_ST_F8_E8M0, 1},
    {"F8_E5M2", DS4_ST_F8_E5M2, 1},
};

const char *ds4_st_dtype_name(int dtype) {
    for (size_t i = 0; i < sizeof st_dtypes / sizeof st_dtypes[0]; i++)
        if (st_dtypes[i].dtype == dtype) return st_dtypes[i].name;
    return "?";
}

int ds4_st_dtype_size(int dtype) {
    for (size_t i = 0; i < sizeof st_dtypes / sizeof st_dtypes[0]; i++)
        if (st_dtypes[i].dtype == dtype) return st_dtypes[i].size;
    return 0;
}

static int dtype_from_name(const char *s) {
    for (size_t i = 0; i < sizeof st_dtypes / sizeof st_dtypes[0]; i++)
        if (!strcmp(st_dtypes[i].name, s)) return st_dtypes[i].dtype;
    return -1;
}

static int add_tensor(ds4_st *st, ds4_st_tensor *t, ds4_err *err) {
    if (st->n == st->cap) {
        int cap = st->cap ? st->cap * 2 : 256;
        ds4_st_tensor *nt = realloc(st->t, (size_t)cap * sizeof *nt);
        if (!nt) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
        st->t = nt;
        st->cap = cap;
    }
    st->t[st->n++] = *t;
    return 0;
}

/* Parses one tensor entry of a header. */
static int parse_entry(ds4_st *st, int file, const char *path, const char *name, json_t *v,
                       const uint8_t *data, uint64_t data_bytes, ds4_err *err) {
    if (!json_is_object(v))
        return ds4_err_set(err, DS4_E_FORMAT, "%s: header entry '%s' is not an object", path, name);
    json_t *jd = json_object_get(v, "dtype"), *js = json_object_get(v, "shape"),
           *jo = json_object_get(v, "data_offsets");
    if (!json_is_string(jd) || !json_is_array(js) || !json_is_array(jo) || json_array_size(jo) != 2)
        return ds4_err_set(err, DS4_E_FORMAT, "%s: tensor '%s' lacks dtype, shape or data_offsets [begin, end]",
                           path, name);
    ds4_st_tensor t;
    memset(&t, 0, sizeof t);
    t.dtype = dtype_from_name(json_string_value(jd));
    if (t.dtype < 0)
        return ds4_err_set(err, DS4_E_FORMAT, "%s: tensor '%s' has unknown dtype '%s'", path, name,
                           json_string_value(jd));
    size_t nd = json_array_size(js);
    if (nd > DS4_ST_MAX_DIMS)
        return ds4_err_set(err, DS4_E_FORMAT, "%s: tensor '%s' has %zu dims (max %d)", path, name, nd,
                           DS4_ST_MAX_DIMS);
    t.n_dims = (int)nd;
    uint64_t n_elems = 1;
    for (size_t i = 0; i < nd; i++) {
        json_t *d = json_array_get(js, i);
        if (!json_is_integer(d) || json_integer_value(d) < 0 || json_integer_value(d) > ((json_int_t)1 << 40))
            return ds4_err_set(err, DS4_E_FORMAT, "%s: tensor '%s' has a bad dimension %zu", path, name, i);
        t.shape[i] = (int64_t)json_integer_value(d);
        if (t.shape[i] && n_elems > UINT64_MAX / (uint64_t)t.shape[i])
            return ds4_err_set(err, DS4_E_FORMAT, "%s: tensor '%s': element count overflows", path, name);
        n_elems *= (uint64_t)t.shape[i];
    }
    t.n_elems = (int64_t)n_elems;
    json_t *jb = json_array_get(jo, 0), *je = json_array_get(jo, 1);
    if (!json_is_integer(jb) || !json_is_integer(je) || json_integer_value(jb) < 0 ||
        json_integer_value(je) < json_integer_value(jb))
        return ds4_err_set(err, DS4_E_FORMAT, "%s: tensor '%s' has bad data_offsets", path, name);
    uint64_t b = (uint64_t)json_integer_value(jb), e = (uint64_t)json_integer_value(je);
    if (e > data_bytes)
        return ds4_err_set(err, DS4_E_FORMAT,
                           "%s: tensor '%s' data [%llu, %llu) lies outside the data area of %llu bytes "
                           "(truncated file?)", path, name, (unsigned long long)b, (unsigned long long)e,
                           (unsigned long long)data_bytes);
    uint64_t es = (uint64_t)ds4_st_dtype_size(t.dtype);
    if (n_elems > UINT64_MAX / es || e - b != n_elems * es)
        return ds4_err_set(err, DS4_E_FORMAT, "%s: tensor '%s' has %llu data bytes, expected %llu (%s x %llu)",
                           path, name, (unsigned long long)(e - b), (unsigned long long)(n_elems * es),
                           ds4_st_dtype_name(t.dtype), (unsigned long long)n_elems);
    t.data = data + b;
    t.n_bytes = e - b;
    t.file = file;
    t.name = strdup(name);
    if (!t.name) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    int rc = add_tensor(st, &t, err);
    if (rc) free(t.name);
    return rc;
}

static int cmp_data(const void *a, const void *b) {
    const ds4_st_tensor *x = *(const ds4_st_tensor *const *)a, *y = *(const ds4_st_tensor *const *)b;
    if (x->data != y->data) return x->data < y->data ? -1 : 1;
    if (x->n_bytes != y->n_bytes) return x->n_bytes < y->n_bytes ? -1 : 1; /* empty tensors first */
    return strcmp(x->name, y->name);
}

/* One file's tensors tile its data area exactly, as the format requires
 * (the reference reader refuses anything else): in offset order each starts
 * where the previous ended, the first at 0 and the last ends at the end of
 * the file. Overlaps would convert one tensor's bytes as another's; a gap
 * or a short area is what a wrong header length looks like (every tensor
 * read a few bytes off: garbage that converts). */
static int check_layout(ds4_st_tensor *t, int n, const uint8_t *data, uint64_t data_bytes, const char *path,
                        ds4_err *err) {
    const ds4_st_tensor **v = malloc((size_t)(n > 0 ? n : 1) * sizeof *v);
    if (!v) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    for (int i = 0; i < n; i++) v[i] = &t[i];
    qsort(v, (size_t)n, sizeof *v, cmp_data);
    int rc = 0;
    uint64_t pos = 0;
    for (int i = 0; i < n && !rc; i++) {
        const uint64_t b = (uint64_t)(v[i]->data - data);
        if (b < pos)
            rc = ds4_err_set(err, DS4_E_FORMAT, "%s: tensors '%s' and '%s' have overlapping data ranges", path,
                             v[i - 1]->name, v[i]->name);
        else if (b > pos)
            rc = ds4_err_set(err, DS4_E_FORMAT, "%s: %llu bytes before tensor '%s' belong to no tensor (a wrong "
                             "header length, or a damaged file)", path, (unsigned long long)(b - pos), v[i]->name);
        pos = b + v[i]->n_bytes;
    }
    if (!rc && pos != data_bytes)
        rc = ds4_err_set(err, DS4_E_FORMAT, "%s: the tensors end at data byte %llu but the file holds %llu (a wrong "
                         "header length, or a damaged file)", path, (unsigned long long)pos,
                         (unsigned long long)data_bytes);
    free(v);
    return rc;
}

/* Maps one file and adds its tensors. */
static int open_file(ds4_st *st, const char *path, ds4_err *err) {
    struct stat sb;
    int fd = ds4_open_regular(path, O_RDONLY, &sb, err); /* a FIFO must not block the open */
    if (fd < 0) return fd;
    uint64_t size = (uint64_t)sb.st_size;
    if (size < 8) {
        close(fd);
        return ds4_err_set(err, DS4_E_FORMAT, "%s: %llu bytes, too short for a safetensors header", path,
                           (unsigned long long)size);
    }
    void *map = mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return ds4_err_set(err, DS4_E_IO, "%s: mmap: %s", path, strerror(errno));
    struct ds4_st_file *nf = realloc(st->files, (size_t)(st->n_files + 1) * sizeof *nf);
    if (!nf) {
        munmap(map, (size_t)size);
        return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    }
    st->files = nf;
    int file = st->n_files++;
    st->files[file].map = map;
    st->files[file].size = (size_t)size;
    st->files[file].path = strdup(path);
    if (!st->files[file].path) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");

    const uint8_t *p = map;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | p[i];
    if (hlen > size - 8 || hlen > ST_MAX_HEADER)
        return ds4_err_set(err, DS4_E_FORMAT,
                           "%s: header length %llu does not fit the file of %llu bytes (not a safetensors file, "
                           "or truncated)", path, (unsigned long long)hlen, (unsigned long long)size);
    json_error_t je;
    json_t *root = json_loadb((const char *)p + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &je);
    if (!root)
        return ds4_err_set(err, DS4_E_FORMAT, "%s: malformed safetensors header (JSON, byte %d): %s", path,
                           je.position, je.text);
    if (!json_is_object(root)) {
        json_decref(root);
        return ds4_err_set(err, DS4_E_FORMAT, "%s: safetensors header is not a JSON object", path);
    }
    const uint8_t *data = p + 8 + hlen;
    uint64_t data_bytes = size - 8 - hlen;
    const char *name;
    json_t *v;
    int rc = 0;
    const int first = st->n;
    json_object_foreach(root, name, v) {
        if (!strcmp(name, "__metadata__")) continue;
        if ((rc = parse_entry(st, file, path, name, v, data, data_bytes, err))) break;
    }
    json_decref(root);
    if (!rc) rc = check_layout(st->t + first, st->n - first, data, data_bytes, path, err);
    return rc;
}

static int cmp_name(const void *a, const void *b) {
    return strcmp(((const ds4_st_tensor *)a)->name, ((const ds4_st_tensor *)b)->name);
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static bool ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && !strcmp(s + n - m, suffix);
}

/* Files named by the index's weight_map (unique, sorted), or an error. */
static int index_files(const char *dir, const char *index_path, json_t **root_out, char ***files_out,
                       int *n_out, ds4_err *err) {
    json_t *root = ds4_conv_load_json(index_path, JSON_REJECT_DUPLICATES, err); /* one shard per tensor */
    if (!root) return err ? err->code : DS4_E_IO;
    json_t *wm = json_object_get(root, "weight_map");
    if (!json_is_object(wm)) {
        json_decref(root);
        return ds4_err_set(err, DS4_E_FORMAT, "%s: no \"weight_map\" object", index_path);
    }
    size_t n = json_object_size(wm);
    char **files = calloc(n ? n : 1, sizeof *files);
    if (!files) {
        json_decref(root);
        return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    }
    int nf = 0;
    const char *k;
    json_t *v;
    json_object_foreach(wm, k, v) {
        const char *fn = json_string_value(v);
        if (!fn || !fn[0] || strchr(fn, '/') || !strcmp(fn, ".") || !strcmp(fn, "..")) {
            /* the message names k, which lives in root: set it before freeing root */
            int rc = ds4_err_set(err, DS4_E_FORMAT, "%s: weight_map entry '%s' is not a file name in %s",
                                 index_path, k, dir);
            free(files);
            json_decref(root);
            return rc;
        }
        files[nf++] = (char *)fn;
    }
    qsort(files, (size_t)nf, sizeof *files, cmp_str);
    int u = 0;
    for (int i = 0; i < nf; i++)
        if (!u || strcmp(files[u - 1], files[i])) files[u++] = files[i];
    *root_out = root;
    *files_out = files;
    *n_out = u;
    return 0;
}

int ds4_st_open_dir(ds4_st *st, const char *dir, ds4_err *err) {
    memset(st, 0, sizeof *st);
    char path[4096];
    int rc = 0;
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    json_t *index = NULL;
    if (access(path, F_OK) == 0) {
        char **files = NULL;
        int nf = 0;
        if ((rc = index_files(dir, path, &index, &files, &nf, err))) return rc;
        for (int i = 0; i < nf && !rc; i++) {
            char fp[4096];
            snprintf(fp, sizeof fp, "%s/%s", dir, files[i]);
            rc = open_file(st, fp, err);
        }
        free(files);
    } else {
        DIR *d = opendir(dir);
        if (!d) return ds4_err_set(err, DS4_E_IO, "%s: %s", dir, strerror(errno));
        char **names = NULL;
        int nn = 0;
        struct dirent *de;
        while ((de = readdir(d))) {
            if (!ends_with(de->d_name, ".safetensors")) continue;
            char **nn2 = realloc(names, (size_t)(nn + 1) * sizeof *names);
            if (!nn2 || !(nn2[nn] = strdup(de->d_name))) {
                free(nn2 ? nn2 : names);
                closedir(d);
                return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
            }
            names = nn2;
            nn++;
        }
        closedir(d);
        qsort(names, (size_t)nn, sizeof *names, cmp_str);
        if (nn == 0) rc = ds4_err_set(err, DS4_E_IO, "%s: no *.safetensors file", dir);
        for (int i = 0; i < nn && !rc; i++) {
            char fp[4096];
            snprintf(fp, sizeof fp, "%s/%s", dir, names[i]);
            rc = open_file(st, fp, err);
        }
        for (int i = 0; i < nn; i++) free(names[i]);
        free(names);
    }
    if (!rc && st->n > 1) {
        qsort(st->t, (size_t)st->n, sizeof *st->t, cmp_name);
        for (int i = 1; i < st->n && !rc; i++)
            if (!strcmp(st->t[i - 1].name, st->t[i].name))
                rc = ds4_err_set(err, DS4_E_FORMAT, "tensor '%s' appears twice (%s and %s)", st->t[i].name,
                                 st->files[st->t[i - 1].file].path, st->files[st->t[i].file].path);
    }
    if (!rc && index) {
        json_t *wm = json_object_get(index, "weight_map");
        const char *k;
        json_t *v;
        json_object_foreach(wm, k, v) {
            const ds4_st_tensor *t = ds4_st_find(st, k);
            const char *base = t ? strrchr(st->files[t->file].path, '/') + 1 : NULL;
            if (!t || strcmp(base, json_string_value(v))) {
                rc = ds4_err_set(err, DS4_E_FORMAT, "tensor '%s' listed in the index is missing from %s", k,
                                 json_string_value(v));
                break;
            }
        }
    }
    json_decref(index);
    if (rc) ds4_st_close(st);
    return rc;
}

const ds4_st_tensor *ds4_st_find(const ds4_st *st, const char *name) {
    int lo = 0, hi = st->n - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2, c = strcmp(st->t[mid].name, name);
        if (!c) return &st->t[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid - 1;
    }
    return NULL;
}

void ds4_st_close(ds4_st *st) {
    for (int i = 0; i < st->n; i++) free(st->t[i].name);
    free(st->t);
    for (int i = 0; i < st->n_files; i++) {
        if (st->files[i].map) munmap(st->files[i].map, st->files[i].size);
        free(st->files[i].path);
    }
    free(st->files);
    memset(st, 0, sizeof *st);
}
