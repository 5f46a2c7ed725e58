/* dsml.c - DSML rendering, parsing, streaming, tracker and replay map
 * (see dsml.h). Skeleton: implementation lands in the next commits. */
#include "dsml.h"

#include <stdlib.h>
#include <string.h>

#define TODO(err) ds4_err_set(err, DS4_E_INTERNAL, "%s: not implemented yet", __func__)

int ds4_dsml_tools_prompt(ds4_buf *o, const char *l, size_t n) { (void)o; (void)l; (void)n; return DS4_E_INTERNAL; }
int ds4_dsml_render_calls(ds4_buf *o, const ds4_tool_call *c, int n) { (void)o; (void)c; (void)n; return DS4_E_INTERNAL; }
int ds4_dsml_tool_result(ds4_buf *o, const char *c, size_t n) { (void)o; (void)c; (void)n; return DS4_E_INTERNAL; }
int ds4_dsml_json_minify(ds4_buf *o, const char *j, size_t n, ds4_err *e) { (void)o; (void)j; (void)n; return TODO(e); }
int ds4_dsml_json_quote(ds4_buf *o, const char *s, size_t n) { (void)o; (void)s; (void)n; return DS4_E_INTERNAL; }
int ds4_dsml_args_compact(ds4_buf *o, const char *a, size_t n) { (void)o; (void)a; (void)n; return DS4_E_INTERNAL; }
int ds4_dsml_call_id(char *o, size_t c, const char *p) { (void)o; (void)c; (void)p; return DS4_E_INTERNAL; }
int ds4_dsml_parse(const char *t, size_t n, int th, ds4_dsml_result *r, ds4_err *e) { (void)t; (void)n; (void)th; memset(r, 0, sizeof *r); return TODO(e); }
void ds4_dsml_result_free(ds4_dsml_result *r) { (void)r; }
int ds4_dsml_repair_suffix(const char *t, size_t n, int th, ds4_buf *s) { (void)t; (void)n; (void)th; (void)s; return 0; }
void ds4_dsml_tracker_init(ds4_dsml_tracker *t) { memset(t, 0, sizeof *t); t->family = -1; }
void ds4_dsml_tracker_feed(ds4_dsml_tracker *t, const char *b, size_t n) { (void)t; (void)b; (void)n; }
ds4_dsml_class ds4_dsml_tracker_class(const ds4_dsml_tracker *t) { (void)t; return DS4_DSML_OUTSIDE; }
int ds4_dsml_class_is_greedy(ds4_dsml_class c) { return c == DS4_DSML_STRUCTURAL || c == DS4_DSML_JSON_STRUCTURAL; }
ds4_dsml_stream *ds4_dsml_stream_new(const ds4_dsml_stream_opts *o) { (void)o; return NULL; }
void ds4_dsml_stream_free(ds4_dsml_stream *s) { (void)s; }
int ds4_dsml_stream_feed(ds4_dsml_stream *s, const char *b, size_t n, ds4_dsml_event_fn f, void *u) { (void)s; (void)b; (void)n; (void)f; (void)u; return DS4_E_INTERNAL; }
int ds4_dsml_stream_finish(ds4_dsml_stream *s, ds4_dsml_event_fn f, void *u, ds4_dsml_result *r, ds4_err *e) { (void)s; (void)f; (void)u; (void)r; return TODO(e); }
ds4_dsml_class ds4_dsml_stream_class(const ds4_dsml_stream *s) { (void)s; return DS4_DSML_OUTSIDE; }
int ds4_dsml_stream_block_started(const ds4_dsml_stream *s) { (void)s; return 0; }
int ds4_dsml_stream_block_ended(const ds4_dsml_stream *s) { (void)s; return 0; }
const char *ds4_dsml_stream_text(const ds4_dsml_stream *s, size_t *n) { (void)s; *n = 0; return ""; }
ds4_dsml_replay *ds4_dsml_replay_new(size_t a, size_t b) { (void)a; (void)b; return NULL; }
void ds4_dsml_replay_free(ds4_dsml_replay *m) { (void)m; }
int ds4_dsml_replay_put(ds4_dsml_replay *m, const char *const *i, int n, const char *b, size_t l, ds4_err *e) { (void)m; (void)i; (void)n; (void)b; (void)l; return TODO(e); }
const char *ds4_dsml_replay_get(ds4_dsml_replay *m, const char *i, size_t *l) { (void)m; (void)i; (void)l; return NULL; }
const char *ds4_dsml_replay_lookup(ds4_dsml_replay *m, const char *const *i, int n, size_t *l) { (void)m; (void)i; (void)n; (void)l; return NULL; }
size_t ds4_dsml_replay_count(const ds4_dsml_replay *m) { (void)m; return 0; }
size_t ds4_dsml_replay_bytes(const ds4_dsml_replay *m) { (void)m; return 0; }
int ds4_dsml_replay_save(const ds4_dsml_replay *m, const char *k, size_t kl, ds4_buf *o) { (void)m; (void)k; (void)kl; (void)o; return DS4_E_INTERNAL; }
int ds4_dsml_replay_load(ds4_dsml_replay *m, const uint8_t *b, size_t n, const char *const *o, int no, size_t *c, ds4_err *e) { (void)m; (void)b; (void)n; (void)o; (void)no; (void)c; return TODO(e); }
int ds4_dsml_replay_from_disk(const ds4_dsml_replay *m, const char *i) { (void)m; (void)i; return -1; }
