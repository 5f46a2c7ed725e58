#!/usr/bin/env bash
# Keeps the include layers honest (STYLE.md "Includes follow the layers"):
# apps (cli/, server/, tools/bench.c) include only ds4.h, chat.h, dsml.h,
# sampler.h, kvstore.h, tokenizer-free headers and util/; backends include
# backend.h, quant.h, model.h and util/, never engine internals.
set -u
cd "$(dirname "$0")/.."
bad=0
check() { # files-glob allowed-regex
    local files=$1 allowed=$2
    for f in $files; do
        [ -f "$f" ] || continue
        while IFS= read -r inc; do
            if ! [[ $inc =~ $allowed ]]; then
                echo "check-includes: $f includes \"$inc\" (not allowed in this layer)"
                bad=1
            fi
        done < <(grep -oE '^#include "[^"]+"' "$f" | sed -E 's/#include "(.*)"/\1/')
    done
}
app_ok='^(ds4\.h|chat\.h|dsml\.h|sampler\.h|kvstore\.h|util/.*|cli\.h|[a-z_]+\.h)$'
check "$(ls cli/*.c server/*.c | grep -v -e '^cli/imatrix.c$' -e '^server/main.c$')" "$app_ok"
# the server's --debug-mtp-accept (speculative serving at a forced acceptance) uses the engine's debug hook
check "server/main.c" '^(ds4\.h|ds4_debug\.h|chat\.h|dsml\.h|sampler\.h|kvstore\.h|util/.*|[a-z_]+\.h)$'
# imatrix collection observes the routed experts through the engine's debug hook
check "cli/imatrix.c" '^(ds4\.h|ds4_debug\.h|util/.*|cli\.h)$'
# the benchmark also reads the engine's debug hooks (roofline inputs, timing)
check "tools/bench.c" '^(ds4\.h|ds4_debug\.h|util/.*)$'
# apps must not reach into engine internals or backends
for f in cli/*.c server/*.c tools/bench.c; do
    [ -f "$f" ] || continue
    if grep -qE '^#include "(model|backend|forward|gguf|quant|engine_internal|cpu/|cuda/)' "$f"; then
        echo "check-includes: $f includes an engine-internal header"; bad=1
    fi
done
for f in src/cpu/*.c src/cuda/*.cu; do
    [ -f "$f" ] || continue
    if grep -qE '^#include "(engine|ds4|chat|dsml|sampler|kvstore|tokenizer)\.h"' "$f"; then
        echo "check-includes: backend file $f includes an engine/app header"; bad=1
    fi
done
[ $bad -eq 0 ] && echo "check-includes: ok"
exit $bad
