/* chat.c - conversation -> prompt text (see chat.h). Skeleton: the
 * implementation lands in the next commits. */
#include "chat.h"

#include <stdlib.h>
#include <string.h>

const char ds4_chat_max_prefix[] = "";
const size_t ds4_chat_max_prefix_len = 0;

ds4_role ds4_chat_role_from_name(const char *n) { (void)n; return DS4_ROLE_OTHER; }
ds4_think ds4_chat_effective_think(ds4_think m, int64_t c) { return (m == DS4_THINK_MAX && c < DS4_THINK_MAX_MIN_CTX) ? DS4_THINK_HIGH : m; }
ds4_chat *ds4_chat_new(void) { return NULL; }
void ds4_chat_free(ds4_chat *c) { (void)c; }
void ds4_chat_set_think(ds4_chat *c, ds4_think m, int64_t n) { c->think = m; c->n_ctx = n; }
int ds4_chat_set_tools(ds4_chat *c, const char *s, size_t n, ds4_err *e) { (void)c; (void)s; (void)n; return ds4_err_set(e, DS4_E_INTERNAL, "todo"); }
int ds4_chat_add_tool_schema(ds4_chat *c, const char *s, size_t n, ds4_err *e) { (void)c; (void)s; (void)n; return ds4_err_set(e, DS4_E_INTERNAL, "todo"); }
int ds4_chat_add(ds4_chat *c, ds4_role r, const char *s, size_t n, ds4_err *e) { (void)c; (void)r; (void)s; (void)n; return ds4_err_set(e, DS4_E_INTERNAL, "todo"); }
int ds4_chat_add_reasoning(ds4_chat *c, int i, const char *s, size_t n, ds4_err *e) { (void)c; (void)i; (void)s; (void)n; return ds4_err_set(e, DS4_E_INTERNAL, "todo"); }
int ds4_chat_add_call(ds4_chat *c, int i, const char *id, const char *nm, const char *a, size_t n, ds4_err *e) { (void)c; (void)i; (void)id; (void)nm; (void)a; (void)n; return ds4_err_set(e, DS4_E_INTERNAL, "todo"); }
int ds4_chat_set_tool_call_id(ds4_chat *c, int i, const char *id, ds4_err *e) { (void)c; (void)i; (void)id; return ds4_err_set(e, DS4_E_INTERNAL, "todo"); }
int ds4_chat_tool_context(const ds4_chat *c) { (void)c; return 0; }
int ds4_chat_render(const ds4_chat *c, ds4_dsml_replay *r, ds4_buf *o, ds4_err *e) { (void)c; (void)r; (void)o; return ds4_err_set(e, DS4_E_INTERNAL, "todo"); }
int ds4_chat_render_completion(ds4_buf *o, const char *p, size_t n, ds4_think m) { (void)o; (void)p; (void)n; (void)m; return DS4_E_INTERNAL; }
void ds4_segs_init(ds4_segs *s) { memset(s, 0, sizeof *s); }
void ds4_segs_free(ds4_segs *s) { (void)s; }
int ds4_segs_push(ds4_segs *s, ds4_seg_kind k, const char *t, size_t n) { (void)s; (void)k; (void)t; (void)n; return DS4_E_INTERNAL; }
int ds4_chat_oneshot_segs(ds4_segs *o, const char *s, const char *p, size_t n, ds4_think m) { (void)o; (void)s; (void)p; (void)n; (void)m; return DS4_E_INTERNAL; }
int ds4_chat_repl_start_segs(ds4_segs *o, const char *s, ds4_think m) { (void)o; (void)s; (void)m; return DS4_E_INTERNAL; }
int ds4_chat_repl_turn_segs(ds4_segs *o, const char *u, size_t n, ds4_think m) { (void)o; (void)u; (void)n; (void)m; return DS4_E_INTERNAL; }
int ds4_chat_message_segs(ds4_segs *o, ds4_role r, const char *c, size_t n) { (void)o; (void)r; (void)c; (void)n; return DS4_E_INTERNAL; }
