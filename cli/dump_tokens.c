/* dump_tokens.c - `ds4 --dump-tokens` (docs/SERVING.md A.5).
 *
 * Tokenizes the -p / --prompt-file text as written with the rendered-chat
 * tokenizer (the seven markers recognized, no template) and prints the JSON
 * array of ids on the first line, then one line per token: the id
 * right-aligned in 6 columns, two spaces, the vocabulary string as stored.
 * Opens the model with vocab_only, so a tokenizer-only GGUF is enough.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

int ds4_cli_dump_tokens(const ds4_cli_opts *o) {
    char *text = NULL;
    size_t len = 0;
    if (o->prompt_file) {
        text = ds4_cli_read_file(o->prompt_file, &len);
        if (!text) return 1; /* it said why */
    } else if (o->prompt) {
        len = strlen(o->prompt);
    } else {
        fprintf(stderr, "ds4: --dump-tokens needs -p TEXT or --prompt-file FILE\n");
        return 2;
    }
    const char *src = text ? text : o->prompt;
    ds4_engine *e = ds4_cli_open_engine(o, true);
    if (!e) {
        free(text);
        return 1;
    }
    int rc = 1;
    int32_t *ids = NULL;
    ds4_err err = {0};
    if (!ds4_has_tokenizer(e)) {
        fprintf(stderr, "ds4: %s has no tokenizer\n", o->model_path);
        goto done;
    }
    /* first call counts, second fills */
    int n = ds4_tokenize(e, src, len, true, NULL, 0, &err);
    if (n >= 0 && !(ids = malloc(sizeof *ids * (size_t)(n ? n : 1)))) {
        fprintf(stderr, "ds4: out of memory for %d tokens\n", n);
        goto done;
    }
    if (n >= 0) n = ds4_tokenize(e, src, len, true, ids, n, &err);
    if (n < 0) {
        fprintf(stderr, "ds4: %s\n", err.msg);
        goto done;
    }
    putchar('[');
    for (int i = 0; i < n; i++) printf(i ? ", %d" : "%d", ids[i]);
    fputs("]\n", stdout);
    for (int i = 0; i < n; i++) {
        const char *s = ds4_token_text(e, ids[i]);
        printf("%6d  %s\n", ids[i], s ? s : "");
    }
    rc = fflush(stdout) == 0 ? 0 : 1;
done:
    free(ids);
    free(text);
    ds4_engine_close(e);
    return rc;
}
