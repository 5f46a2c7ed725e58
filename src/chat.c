/* chat.c - conversation -> prompt text (docs/TEXT.md §B; see chat.h).
 *
 * The renderer is a single pass over the messages with two flags, exactly
 * as B.4 states: "assistant pending" (a user/tool turn is open and the next
 * assistant message gets the ASSISTANT marker and a reasoning part) and
 * "tool pending" (the previous rendered item was a tool result, so a
 * following tool result joins the same user turn). Every string of a chat
 * is an owned copy; contents keep explicit lengths (NULs allowed).
 */
#include "chat.h"

#include <stdlib.h>
#include <string.h>

/* B.3: 476 bytes, SHA-1 bed6f7c6d90743ed442f3da80117db88a8fc16a6. */
const char ds4_chat_max_prefix[] =
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem "
    "to resolve the root cause, rigorously stress-testing your logic against all potential "
    "paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate "
    "step, considered alternative, and rejected hypothesis to ensure absolutely no "
    "assumption is left unchecked.\n"
    "\n";
const size_t ds4_chat_max_prefix_len = sizeof ds4_chat_max_prefix - 1;

ds4_role ds4_chat_role_from_name(const char *name) {
    static const struct { const char *s; ds4_role r; } tab[] = {
        {"system", DS4_ROLE_SYSTEM}, {"developer", DS4_ROLE_DEVELOPER},
        {"user", DS4_ROLE_USER},     {"assistant", DS4_ROLE_ASSISTANT},
        {"tool", DS4_ROLE_TOOL},     {"function", DS4_ROLE_FUNCTION},
    };
    if (!name) return DS4_ROLE_OTHER;
    for (size_t i = 0; i < sizeof tab / sizeof tab[0]; i++)
        if (strcmp(name, tab[i].s) == 0) return tab[i].r;
    return DS4_ROLE_OTHER;
}

ds4_think ds4_chat_effective_think(ds4_think mode, int64_t n_ctx) {
    if (mode == DS4_THINK_MAX && n_ctx < DS4_THINK_MAX_MIN_CTX) return DS4_THINK_HIGH;
    return mode;
}

/* ------------------------------------------------------------ building */

/* malloc'd NUL-terminated copy of p[0..n), NULL on no memory. */
static char *dup_n(const char *p, size_t n) {
    char *s = malloc(n + 1);
    if (!s) return NULL;
    if (n) memcpy(s, p, n);
    s[n] = '\0';
    return s;
}

static int nomem(ds4_err *err, const char *what) {
    return ds4_err_set(err, DS4_E_NOMEM, "chat: no memory for %s", what);
}

ds4_chat *ds4_chat_new(void) {
    ds4_chat *c = calloc(1, sizeof *c);
    if (c) c->think = DS4_THINK_HIGH;
    return c;
}

static void free_msg(ds4_chat_msg *m) {
    free(m->content);
    free(m->reasoning);
    for (int j = 0; j < m->n_calls; j++) {
        free(m->calls[j].id);
        free(m->calls[j].name);
        free(m->calls[j].arguments);
    }
    free(m->calls);
    free(m->tool_call_id);
}

void ds4_chat_free(ds4_chat *c) {
    if (!c) return;
    for (int i = 0; i < c->n_msgs; i++) free_msg(&c->msgs[i]);
    free(c->msgs);
    free(c->tools);
    free(c);
}

void ds4_chat_set_think(ds4_chat *c, ds4_think mode, int64_t n_ctx) {
    c->think = mode;
    c->n_ctx = n_ctx;
}

int ds4_chat_set_tools(ds4_chat *c, const char *lines, size_t len, ds4_err *err) {
    char *t = NULL;
    if (len) {
        t = dup_n(lines, len);
        if (!t) return nomem(err, "tool schemas");
    }
    free(c->tools);
    c->tools = t;
    c->tools_len = len;
    return 0;
}

int ds4_chat_add_tool_schema(ds4_chat *c, const char *line, size_t len, ds4_err *err) {
    size_t old = c->tools ? c->tools_len : 0;
    size_t add = len + (old ? 1 : 0);
    char *t = realloc(c->tools, old + add + 1);
    if (!t) return nomem(err, "tool schemas");
    if (old) t[old++] = '\n';
    memcpy(t + old, line, len);
    t[old + len] = '\0';
    c->tools = t;
    c->tools_len = old + len;
    return 0;
}

void ds4_chat_move_last(ds4_chat *c, int to) {
    if (to < 0 || to >= c->n_msgs - 1) return;
    ds4_chat_msg m = c->msgs[c->n_msgs - 1];
    memmove(c->msgs + to + 1, c->msgs + to, (size_t)(c->n_msgs - 1 - to) * sizeof m);
    c->msgs[to] = m;
}

int ds4_chat_add(ds4_chat *c, ds4_role role, const char *content, size_t len, ds4_err *err) {
    if (c->n_msgs == c->cap_msgs) {
        int cap = c->cap_msgs ? 2 * c->cap_msgs : 8;
        ds4_chat_msg *m = realloc(c->msgs, (size_t)cap * sizeof *m);
        if (!m) return nomem(err, "messages");
        c->msgs = m;
        c->cap_msgs = cap;
    }
    ds4_chat_msg *m = &c->msgs[c->n_msgs];
    memset(m, 0, sizeof *m);
    m->role = role;
    m->content = dup_n(content ? content : "", content ? len : 0);
    if (!m->content) return nomem(err, "message content");
    m->content_len = content ? len : 0;
    return c->n_msgs++;
}

static int check_index(const ds4_chat *c, int i, ds4_err *err) {
    if (i < 0 || i >= c->n_msgs)
        return ds4_err_set(err, DS4_E_ARG, "chat: message index %d out of range (%d)", i,
                           c->n_msgs);
    return 0;
}

int ds4_chat_add_reasoning(ds4_chat *c, int i, const char *text, size_t len, ds4_err *err) {
    if (check_index(c, i, err)) return DS4_E_ARG;
    ds4_chat_msg *m = &c->msgs[i];
    size_t old = m->reasoning ? m->reasoning_len : 0;
    char *r = realloc(m->reasoning, old + len + 1);
    if (!r) return nomem(err, "reasoning");
    if (len) memcpy(r + old, text, len);
    r[old + len] = '\0';
    m->reasoning = r;
    m->reasoning_len = old + len;
    return 0;
}

int ds4_chat_add_call(ds4_chat *c, int i, const char *id, const char *name,
                      const char *arguments, size_t args_len, ds4_err *err) {
    if (check_index(c, i, err)) return DS4_E_ARG;
    ds4_chat_msg *m = &c->msgs[i];
    ds4_tool_call *v = realloc(m->calls, (size_t)(m->n_calls + 1) * sizeof *v);
    if (!v) return nomem(err, "tool calls");
    m->calls = v;
    ds4_tool_call *tc = &v[m->n_calls];
    tc->id = id ? dup_n(id, strlen(id)) : NULL;
    tc->name = dup_n(name ? name : "", name ? strlen(name) : 0);
    tc->arguments = dup_n(arguments ? arguments : "", arguments ? args_len : 0);
    tc->arguments_len = arguments ? args_len : 0;
    if ((id && !tc->id) || !tc->name || !tc->arguments) {
        free(tc->id);
        free(tc->name);
        free(tc->arguments);
        return nomem(err, "tool call");
    }
    m->n_calls++;
    return 0;
}

int ds4_chat_set_canonical_calls(ds4_chat *c, int i, ds4_err *err) {
    if (check_index(c, i, err)) return DS4_E_ARG;
    c->msgs[i].canonical_calls = 1;
    return 0;
}

int ds4_chat_set_tool_call_id(ds4_chat *c, int i, const char *id, ds4_err *err) {
    if (check_index(c, i, err)) return DS4_E_ARG;
    char *s = id ? dup_n(id, strlen(id)) : NULL;
    if (id && !s) return nomem(err, "tool call id");
    free(c->msgs[i].tool_call_id);
    c->msgs[i].tool_call_id = s;
    return 0;
}

int ds4_chat_tool_context(const ds4_chat *c) {
    if (c->tools_len > 0) return 1;
    for (int i = 0; i < c->n_msgs; i++) {
        const ds4_chat_msg *m = &c->msgs[i];
        if (m->role == DS4_ROLE_TOOL || m->role == DS4_ROLE_FUNCTION) return 1;
        if (m->role == DS4_ROLE_ASSISTANT && m->n_calls > 0) return 1;
    }
    return 0;
}

/* ----------------------------------------------------------- rendering */

/* The assistant's DSML: the exact sampled block when every call id maps to
 * one remembered block (C.8), else the canonical rendering (C.4). */
static int render_calls(ds4_buf *out, const ds4_chat_msg *m, ds4_dsml_replay *replay) {
    if (m->n_calls == 0) return 0;
    if (replay && !m->canonical_calls) {
        const char *ids[64] = {0};
        const char **v = m->n_calls <= 64 ? ids : malloc((size_t)m->n_calls * sizeof *v);
        if (!v) return DS4_E_NOMEM;
        int all = 1;
        for (int j = 0; j < m->n_calls; j++) {
            v[j] = m->calls[j].id;
            if (!v[j]) all = 0;
        }
        size_t len = 0;
        const char *blk = all ? ds4_dsml_replay_lookup(replay, v, m->n_calls, &len) : NULL;
        if (v != ids) free(v);
        if (blk) return ds4_buf_append(out, blk, len);
    }
    return ds4_dsml_render_calls(out, m->calls, m->n_calls);
}

static void gen_prefix(ds4_buf *out, ds4_think mode) {
    ds4_buf_puts(out, DS4_ASSISTANT);
    ds4_buf_puts(out, mode == DS4_THINK_NONE ? DS4_THINK_CLOSE : DS4_THINK_OPEN);
}

int ds4_chat_continues(const ds4_chat *c) {
    if (c->n_msgs < 1) return 0;
    const ds4_chat_msg *m = &c->msgs[c->n_msgs - 1];
    return m->role == DS4_ROLE_ASSISTANT && m->n_calls == 0;
}

int ds4_chat_render(const ds4_chat *c, ds4_dsml_replay *replay, ds4_buf *out, ds4_err *err) {
    return ds4_chat_render_at(c, replay, out, NULL, err);
}

int ds4_chat_render_at(const ds4_chat *c, ds4_dsml_replay *replay, ds4_buf *out, size_t *offs, ds4_err *err) {
    ds4_think mode = ds4_chat_effective_think(c->think, c->n_ctx);
    int tool_ctx = ds4_chat_tool_context(c);
    int last_input = -1; /* index of the last user/tool/function message */
    for (int i = 0; i < c->n_msgs; i++) {
        ds4_role r = c->msgs[i].role;
        if (r == DS4_ROLE_USER || r == DS4_ROLE_TOOL || r == DS4_ROLE_FUNCTION) last_input = i;
    }

    ds4_buf_puts(out, DS4_BOS);
    if (mode == DS4_THINK_MAX) ds4_buf_append(out, ds4_chat_max_prefix, ds4_chat_max_prefix_len);

    /* System block: tools prompt first, then every system/developer text
     * wherever it appears, joined by blank lines (B.4 step 3). */
    size_t sys_start = out->len;
    if (c->tools_len > 0) ds4_dsml_tools_prompt(out, c->tools, c->tools_len);
    for (int i = 0; i < c->n_msgs; i++) {
        const ds4_chat_msg *m = &c->msgs[i];
        if (m->role != DS4_ROLE_SYSTEM && m->role != DS4_ROLE_DEVELOPER) continue;
        if (out->len > sys_start) ds4_buf_puts(out, "\n\n");
        ds4_buf_append(out, m->content, m->content_len);
    }

    int a_pending = 0, t_pending = 0, turns = 0;
    const int cont = ds4_chat_continues(c);
    for (int i = 0; i < c->n_msgs; i++) {
        const ds4_chat_msg *m = &c->msgs[i];
        if (offs) offs[i] = out->len;
        switch (m->role) {
        case DS4_ROLE_USER:
            ds4_buf_puts(out, DS4_USER);
            ds4_buf_append(out, m->content, m->content_len);
            a_pending = 1;
            t_pending = 0;
            break;
        case DS4_ROLE_TOOL:
        case DS4_ROLE_FUNCTION:
            if (!t_pending) ds4_buf_puts(out, DS4_USER);
            ds4_dsml_tool_result(out, m->content, m->content_len);
            a_pending = 1;
            t_pending = 1;
            break;
        case DS4_ROLE_ASSISTANT:
            if (a_pending) {
                ds4_buf_puts(out, DS4_ASSISTANT);
                if (mode != DS4_THINK_NONE && (tool_ctx || i > last_input)) {
                    ds4_buf_puts(out, DS4_THINK_OPEN);
                    if (m->reasoning) ds4_buf_append(out, m->reasoning, m->reasoning_len);
                }
                ds4_buf_puts(out, DS4_THINK_CLOSE);
            }
            ds4_buf_append(out, m->content, m->content_len);
            if (render_calls(out, m, replay)) out->oom = 1;
            if (!(cont && i == c->n_msgs - 1)) ds4_buf_puts(out, DS4_EOS); /* a prefill stays open */
            a_pending = t_pending = 0;
            turns++;
            break;
        default: /* system/developer rendered above; other roles dropped */
            break;
        }
        if (m->role == DS4_ROLE_USER || m->role == DS4_ROLE_TOOL || m->role == DS4_ROLE_FUNCTION) turns++;
    }
    if (offs) offs[c->n_msgs] = out->len;
    if (!turns) { /* only system text: answer it after an empty user turn */
        ds4_buf_puts(out, DS4_USER);
        a_pending = 1;
    }
    if (a_pending) gen_prefix(out, mode);
    if (!ds4_buf_ok(out)) return nomem(err, "rendered prompt");
    return 0;
}

int ds4_chat_render_completion(ds4_buf *out, const char *prompt, size_t len, ds4_think mode) {
    ds4_buf_puts(out, DS4_BOS);
    if (mode == DS4_THINK_MAX) ds4_buf_append(out, ds4_chat_max_prefix, ds4_chat_max_prefix_len);
    ds4_buf_puts(out, DS4_CHAT_DEFAULT_SYSTEM);
    ds4_buf_puts(out, DS4_USER);
    ds4_buf_append(out, prompt, len);
    gen_prefix(out, mode);
    return ds4_buf_ok(out) ? 0 : DS4_E_NOMEM;
}

/* ------------------------------------------------- token-level builders */

void ds4_segs_init(ds4_segs *s) { memset(s, 0, sizeof *s); }

void ds4_segs_free(ds4_segs *s) {
    for (int i = 0; i < s->n; i++) free(s->v[i].text);
    free(s->v);
    ds4_segs_init(s);
}

int ds4_segs_push(ds4_segs *s, ds4_seg_kind kind, const char *text, size_t len) {
    if (kind == DS4_SEG_PLAIN && len == 0) return 0;
    if (s->n == s->cap) {
        int cap = s->cap ? 2 * s->cap : 16;
        ds4_seg *v = realloc(s->v, (size_t)cap * sizeof *v);
        if (!v) return DS4_E_NOMEM;
        s->v = v;
        s->cap = cap;
    }
    char *t = dup_n(text, len);
    if (!t) return DS4_E_NOMEM;
    s->v[s->n++] = (ds4_seg){kind, t, len};
    return 0;
}

static int push_special(ds4_segs *s, const char *marker) {
    return ds4_segs_push(s, DS4_SEG_SPECIAL, marker, strlen(marker));
}

int ds4_chat_repl_start_segs(ds4_segs *out, const char *system, ds4_think mode) {
    int rc = push_special(out, DS4_BOS);
    if (!rc && mode == DS4_THINK_MAX)
        rc = ds4_segs_push(out, DS4_SEG_PLAIN, ds4_chat_max_prefix, ds4_chat_max_prefix_len);
    if (!rc && system) rc = ds4_segs_push(out, DS4_SEG_PLAIN, system, strlen(system));
    return rc;
}

int ds4_chat_repl_turn_segs(ds4_segs *out, const char *user, size_t len, ds4_think mode) {
    int rc = push_special(out, DS4_USER);
    if (!rc) rc = ds4_segs_push(out, DS4_SEG_PLAIN, user, len);
    if (!rc) rc = push_special(out, DS4_ASSISTANT);
    if (!rc) rc = push_special(out, mode == DS4_THINK_NONE ? DS4_THINK_CLOSE : DS4_THINK_OPEN);
    return rc;
}

int ds4_chat_oneshot_segs(ds4_segs *out, const char *system, const char *prompt,
                          size_t prompt_len, ds4_think mode) {
    size_t bos_len = strlen(DS4_BOS);
    if (prompt_len >= bos_len && memcmp(prompt, DS4_BOS, bos_len) == 0)
        return ds4_segs_push(out, DS4_SEG_RENDERED, prompt, prompt_len);
    int rc = ds4_chat_repl_start_segs(out, system, mode);
    if (!rc) rc = ds4_chat_repl_turn_segs(out, prompt, prompt_len, mode);
    return rc;
}

static int starts_with(const char *p, size_t n, const char *lit) {
    size_t k = strlen(lit);
    return n >= k && memcmp(p, lit, k) == 0;
}

int ds4_chat_message_segs(ds4_segs *out, ds4_role role, const char *content, size_t len) {
    int rc = 0;
    switch (role) {
    case DS4_ROLE_SYSTEM:
    case DS4_ROLE_DEVELOPER:
        return ds4_segs_push(out, DS4_SEG_PLAIN, content, len);
    case DS4_ROLE_ASSISTANT:
        rc = push_special(out, DS4_ASSISTANT);
        if (!rc && !starts_with(content, len, DS4_THINK_OPEN) &&
            !starts_with(content, len, DS4_THINK_CLOSE))
            rc = push_special(out, DS4_THINK_CLOSE);
        if (!rc) rc = ds4_segs_push(out, DS4_SEG_PLAIN, content, len);
        return rc;
    default:
        rc = push_special(out, DS4_USER);
        if (!rc && (role == DS4_ROLE_TOOL || role == DS4_ROLE_FUNCTION))
            rc = ds4_segs_push(out, DS4_SEG_PLAIN, "Tool: ", 6);
        if (!rc) rc = ds4_segs_push(out, DS4_SEG_PLAIN, content, len);
        return rc;
    }
}
