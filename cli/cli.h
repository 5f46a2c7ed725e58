/* cli.h - the ds4 command line: parsed options and one function per mode.
 *
 * main.c parses argv into ds4_cli_opts and dispatches to exactly one mode.
 * Each mode lives in its own file and returns the process exit status
 * (0 ok, 1 runtime error, 2 usage error). Modes print results to stdout and
 * logs/progress to stderr.
 */
#ifndef DS4_CLI_H
#define DS4_CLI_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "chat.h"
#include "ds4.h"
#include "sampler.h"

typedef struct ds4_cli_opts {
    const char *model_path;        /* -m */
    const char *mtp_path;          /* --mtp */
    int mtp_draft;                 /* --mtp-draft N (1..4, default 3) */
    float mtp_gate;                /* --mtp-gate P (default 0.3) */
    ds4_backend_kind backend;      /* --cpu / --cuda */
    int n_threads;                 /* -t */
    int n_ctx;                     /* -c / --ctx */
    const char *prompt;            /* -p (NULL if none) */
    const char *prompt_file;       /* --prompt-file */
    const char *prompt_tokens_file;/* --prompt-tokens-file: whitespace-separated ids */
    const char *system;            /* -sys (default "You are a helpful assistant") */
    int n_predict;                 /* -n */
    float temp, top_p, min_p;      /* --temp --top-p --min-p */
    int top_k;                     /* --top-k (0 = off) */
    uint64_t seed;                 /* --seed 1..2^31-1 (0: not given, time-based) */
    int think;                     /* 0 none, 1 high, 2 max */
    bool dump_tokens;              /* --dump-tokens */
    const char *dump_logits;       /* --dump-logits OUT.f32 */
    ds4_eval_mode eval_mode;       /* --eval prefill|decode|chunk:N */
    int eval_chunk;
    int dump_greedy;               /* --dump-greedy N (with --dump-logits) */
    int layers;                    /* --layers N (diagnostic) */
    unsigned numerics_off;         /* --numerics-off fp8,fp4,f16,act (diagnostic) */
    bool plain_numerics;           /* --plain-numerics (diagnostic) */
    bool cuda_sync_debug;          /* --cuda-sync-debug (diagnostic) */
    bool no_graphs;                /* --no-graphs (diagnostic) */
    bool ignore_eos;               /* --ignore-eos (diagnostic): EOS is never sampled */
    ds4_engine_opts split;         /* --gpus / --split / --ranks: only the layer-split fields are used */
    const char *worker;            /* --worker HOST:PORT: serve rank 0 there */
    int rank;                      /* --rank R of a worker */
    bool model_given;              /* -m was on the command line */
    const char *dump_logprobs;     /* --dump-logprobs FILE */
    int logprobs_top_k;            /* --logprobs-top-k */
    const char *perplexity_file;   /* --perplexity-file */
    bool inspect;                  /* --inspect */
    const char *imatrix_out;       /* --imatrix-out FILE.dat */
    const char *imatrix_dump;      /* --imatrix-dump FILE (tests: raw expert activations) */
} ds4_cli_opts;

/* Reads the whole file at path into a NUL-terminated malloc'ed buffer. */
char *ds4_cli_read_file(const char *path, size_t *len);
/* Reads a whole regular file for /load (no size limit); NULL (message printed)
 * for anything else, without blocking on a FIFO. */
unsigned char *ds4_cli_read_regular(const char *path, size_t *len);
/* Opens the engine with the CLI options; prints the error and returns NULL. */
ds4_engine *ds4_cli_open_engine(const ds4_cli_opts *o, bool vocab_only);

int ds4_cli_dump_tokens(const ds4_cli_opts *o);   /* dump_tokens.c */
int ds4_cli_dump_logits(const ds4_cli_opts *o);   /* dump_logits.c */
int ds4_cli_generate(const ds4_cli_opts *o);      /* generate.c: one-shot */
int ds4_cli_repl(const ds4_cli_opts *o);          /* repl.c */
int ds4_cli_dump_logprobs(const ds4_cli_opts *o); /* logprobs.c */
int ds4_cli_perplexity(const ds4_cli_opts *o);    /* logprobs.c */
int ds4_cli_inspect(const ds4_cli_opts *o);       /* main.c */
int ds4_cli_imatrix(const ds4_cli_opts *o);       /* imatrix.c */

/* ---- Shared by the generating modes (generate.c) ------------------------ */

/* Set to the signal's number by SIGINT (Ctrl+C) once ds4_cli_install_sigint
 * ran, or by SIGINT or SIGTERM once ds4_cli_install_stop_signals ran (the
 * one-shot modes: a kill stops them as Ctrl+C does, with the stats line);
 * the generating loops poll it and the prefill progress callback returns
 * it (cancel). A second signal while it is still set kills the process as
 * usual. */
extern volatile sig_atomic_t ds4_cli_interrupted;
void ds4_cli_install_sigint(void);
void ds4_cli_install_stop_signals(void);
/* The shell's status of a run cut by the signal in ds4_cli_interrupted
 * (128 + N: 130 SIGINT, 143 SIGTERM). */
int ds4_cli_signal_status(void);

/* A growable token list. push returns 0 or DS4_E_NOMEM. */
typedef struct ds4_cli_toks {
    int32_t *v; /* (n) */
    int n, cap;
} ds4_cli_toks;
int ds4_cli_toks_push(ds4_cli_toks *t, const int32_t *ids, int n);
void ds4_cli_toks_free(ds4_cli_toks *t);

/* Token ids of a --prompt-tokens-file (the one parser of that format):
 * whitespace-separated decimal ids in 0..n_vocab-1 (n_vocab <= 0: any id
 * >= 0), at least one. Appends them to *out; prints the error and returns
 * -1 on a bad or empty file. */
int ds4_cli_read_token_file(const char *path, int n_vocab, ds4_cli_toks *out);

/* Appends the tokens of prompt segments (chat.h B.6 builders) to *out. A
 * SPECIAL segment must be exactly one token. Prints the error; returns 0/-1. */
int ds4_cli_tokenize_segs(ds4_engine *e, const ds4_segs *segs, ds4_cli_toks *out);

/* Prefill progress for ds4_session_sync: a bar on a TTY stderr, plain
 * "processing N input tokens: done/N (P%)" lines otherwise. Returns
 * ds4_cli_interrupted (non-zero cancels). user is a ds4_cli_progress. */
typedef struct ds4_cli_progress {
    bool tty;
    double t0;
    int last_pct;
} ds4_cli_progress;
void ds4_cli_progress_init(ds4_cli_progress *p);
int ds4_cli_progress_cb(void *user, const char *what, int64_t done, int64_t total);
/* Ends a bar line (TTY) if one was drawn. */
void ds4_cli_progress_end(ds4_cli_progress *p);

/* Streams generated tokens to a FILE through the engine's detokenizer
 * (ds4.h: whole UTF-8 characters only, U+FFFD for bytes that cannot form
 * one), <think>/</think> tokens removed, reasoning grey (ESC[90m) when the
 * stream is a terminal, a newline at the end of the reasoning and at the
 * end of the output. */
typedef struct ds4_cli_printer {
    FILE *out;
    const ds4_engine *e;
    ds4_detok *detok;   /* NULL when the model has no tokenizer: the ids are printed */
    bool color;         /* out is a terminal */
    bool in_reasoning;  /* between <think> (or the prompt's) and </think> */
    bool grey;          /* the grey colour is switched on */
    int32_t think_open, think_close;
    int last_byte;      /* last byte written, -1 before any */
} ds4_cli_printer;
void ds4_cli_printer_init(ds4_cli_printer *p, const ds4_engine *e, FILE *out, bool reasoning);
void ds4_cli_printer_token(ds4_cli_printer *p, int32_t id);
/* Flushes held-back bytes, resets the colour, ensures a final newline;
 * releases the detokenizer. */
void ds4_cli_printer_finish(ds4_cli_printer *p);

/* Sampler parameters from the options (seed: --seed or entropy). */
ds4_sampler_params ds4_cli_sampler_params(const ds4_cli_opts *o);
/* The requested thinking mode after the Think-Max context gate; prints the
 * warning of B.2 when max falls back to high. */
ds4_think ds4_cli_think_mode(int think, int n_ctx, bool warn);
/* Monotonic seconds. */
double ds4_cli_now(void);

/* One-shot prompt tokens (A.3 step 1, docs/TEXT.md B.6), or the ids of
 * --prompt-tokens-file. *reasoning: generation starts inside <think>.
 * Prints errors; returns 0 or -1. */
int ds4_cli_build_prompt(ds4_engine *e, const ds4_cli_opts *o, ds4_think mode, ds4_cli_toks *out,
                         bool *reasoning);
/* Opens the engine (a load message on a TTY) and a session of n_ctx tokens.
 * Prints errors; returns 0 or -1. */
ds4_session *ds4_cli_new_session(const ds4_cli_opts *o, ds4_engine *e, int n_ctx, ds4_err *err);
int ds4_cli_open_session(const ds4_cli_opts *o, int n_ctx, ds4_engine **e, ds4_session **s);
/* ds4_session_sync with the progress display; *secs gets the wall time.
 * Prints errors; returns 0, DS4_E_CANCEL (Ctrl+C) or another code. */
int ds4_cli_prefill(ds4_session *s, const ds4_cli_toks *prompt, ds4_sync_info *info, double *secs);

/* The decode loop shared by one-shot and REPL turns: sample from the
 * session's logits, stop at EOS (not printed or kept), at max_new or on
 * Ctrl+C; print and record each token; evaluate each token except the last. */
typedef struct ds4_cli_gen_args {
    const ds4_engine *e;
    ds4_session *s;
    ds4_sampler *sampler;
    ds4_sampler_params params;
    ds4_rng *rng;
    ds4_cli_printer *printer;  /* may be NULL */
    ds4_cli_toks *transcript;  /* sampled tokens appended; may be NULL */
    int max_new;
    bool ignore_eos;           /* EOS is never sampled: the reply runs to max_new or Ctrl+C */
} ds4_cli_gen_args;
typedef struct ds4_cli_gen_result {
    int n_generated;  /* tokens sampled and printed (EOS excluded) */
    int n_evaluated;  /* decode steps run */
    bool eos, interrupted, failed;
    double secs;
    bool spec;              /* speculative decoding ran (--mtp) */
    ds4_spec_stats spec_st; /* its counters for this generation */
} ds4_cli_gen_result;
int ds4_cli_generate_loop(const ds4_cli_gen_args *g, ds4_cli_gen_result *r);
/* The two final stderr lines (tokens: ...; prefill: X t/s, generation: Y t/s). */
void ds4_cli_print_stats(int n_prompt, const ds4_sync_info *info, double prefill_s,
                         const ds4_cli_gen_result *r);

/* rc, or 1 when writing standard output failed (a full disk, /dev/full, a
 * file-size limit): the output was lost and the caller must not see 0.
 * Closes stdout (errors that show only then included) and says why. */
int ds4_cli_stdout_status(int rc);

#endif
