/* cli.h - the ds4 command line: parsed options and one function per mode.
 *
 * main.c parses argv into ds4_cli_opts and dispatches to exactly one mode.
 * Each mode lives in its own file and returns the process exit status
 * (0 ok, 1 runtime error, 2 usage error). Modes print results to stdout and
 * logs/progress to stderr.
 */
#ifndef DS4_CLI_H
#define DS4_CLI_H

#include <stdbool.h>
#include <stdint.h>

#include "ds4.h"

typedef struct ds4_cli_opts {
    const char *model_path;        /* -m */
    const char *mtp_path;          /* --mtp */
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
    uint64_t seed;                 /* --seed (0 = time-based) */
    int think;                     /* 0 none, 1 high, 2 max */
    bool dump_tokens;              /* --dump-tokens */
    const char *dump_logits;       /* --dump-logits OUT.f32 */
    ds4_eval_mode eval_mode;       /* --eval prefill|decode|chunk:N */
    int eval_chunk;
    bool plain_numerics;           /* --plain-numerics (diagnostic) */
    const char *dump_logprobs;     /* --dump-logprobs FILE */
    int logprobs_top_k;            /* --logprobs-top-k */
    const char *perplexity_file;   /* --perplexity-file */
    bool inspect;                  /* --inspect */
} ds4_cli_opts;

/* Reads the whole file at path into a NUL-terminated malloc'ed buffer. */
char *ds4_cli_read_file(const char *path, size_t *len);
/* Opens the engine with the CLI options; prints the error and returns NULL. */
ds4_engine *ds4_cli_open_engine(const ds4_cli_opts *o, bool vocab_only);

int ds4_cli_dump_tokens(const ds4_cli_opts *o);   /* dump_tokens.c */
int ds4_cli_dump_logits(const ds4_cli_opts *o);   /* dump_logits.c */
int ds4_cli_generate(const ds4_cli_opts *o);      /* generate.c: one-shot */
int ds4_cli_repl(const ds4_cli_opts *o);          /* repl.c */
int ds4_cli_dump_logprobs(const ds4_cli_opts *o); /* logprobs.c */
int ds4_cli_perplexity(const ds4_cli_opts *o);    /* logprobs.c */
int ds4_cli_inspect(const ds4_cli_opts *o);       /* main.c */

#endif
