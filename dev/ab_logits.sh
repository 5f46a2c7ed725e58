#!/usr/bin/env bash
# dev/ab_logits.sh MODEL VAR=VALUE [VAR=VALUE...] - a switch's logits against the default run's, bit for bit,
# on a 200-token prompt in prefill, token-by-token decode and chunks of 3 (a quick device-side check of a new
# A/B switch before the stage models of make test-cuda exist); prints "same" or "DIFFERS" per mode
set -uo pipefail
m=$1; shift
python3 -c "import random; r = random.Random(3); print(' '.join(str(r.randrange(300)) for _ in range(200)))" > /tmp/ab_t.txt
rc=0
for mode in prefill decode chunk:3; do
    ./ds4 -m "$m" --cuda --prompt-tokens-file /tmp/ab_t.txt --dump-logits /tmp/ab_a.f32 --eval $mode > /dev/null 2>&1 || { echo "$mode: default run failed"; rc=1; continue; }
    env "$@" ./ds4 -m "$m" --cuda --prompt-tokens-file /tmp/ab_t.txt --dump-logits /tmp/ab_b.f32 --eval $mode > /dev/null 2>&1 || { echo "$mode: $* run failed"; rc=1; continue; }
    if cmp -s /tmp/ab_a.f32 /tmp/ab_b.f32; then echo "$mode $*: same ($(stat -c %s /tmp/ab_a.f32) bytes)"; else echo "$mode $*: DIFFERS"; rc=1; fi
done
exit $rc
