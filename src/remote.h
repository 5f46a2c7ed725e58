/* remote.h - parts of a layer split in other processes (ranks): a proxy
 * backend on rank 0 that forwards every backend op over a channel, and the
 * worker loop that runs them on the rank's own backend (docs/ARCHITECTURE.md
 * 6b "Ranks").
 *
 * forward.c keeps the one layer loop on rank 0: a remote part is just a part
 * whose backend is the proxy. Weights never cross the channel: the worker
 * opens the model itself and binds its blocks; the proxy gets back the
 * worker's bound model description, whose data pointers are the worker's
 * memory and are passed through untouched. Pointers to the description's
 * host structs (the model, a layer, a weight or RoPE struct inside them) are
 * rewritten to the worker's copies before a stage is sent. Stage calls are
 * sent without waiting (their errors come back with step_end, as the
 * contract allows); every other op waits for its reply.
 *
 * Channels carry bytes in order between rank 0 and one worker. The TCP
 * channel is the rendezvous (and, for tests and CPU-only use, the data
 * path); GPU ranks are meant to move data through NCCL, whose communicator
 * the rendezvous sets up (not built yet: see the architecture notes).
 */
#ifndef DS4_REMOTE_H
#define DS4_REMOTE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "util/err.h"

typedef struct ds4_chan ds4_chan;

/* Rank 0: listens on host:port and accepts n_workers connections; chans[r-1]
 * is rank r's (each worker says its rank on connect; duplicates and ranks
 * out of 1..n_workers are refused). Waits up to timeout_s for all. */
int ds4_chan_listen(const char *hostport, int n_workers, int timeout_s, ds4_chan **chans, ds4_err *err);
/* A worker: connects to rank 0 (retrying up to timeout_s) as rank `rank`. */
int ds4_chan_connect(const char *hostport, int rank, int timeout_s, ds4_chan **out, ds4_err *err);
void ds4_chan_close(ds4_chan *c);

/* What a worker binds: its own copy of the model rank 0 runs. */
typedef struct ds4_remote_model {
    const char *model_path;   /* the GGUF on the worker's host (rank 0 sends its own path when NULL) */
    const char *mtp_path;
    const char *synthetic;    /* "q2" / "q4": the synthetic model of that recipe */
    uint64_t seed;
    uint8_t fp[32];           /* rank 0's model fingerprint: a worker whose model differs is refused */
    int reply_timeout_s;      /* a reply later than this (0: 600 s; binding: at least 3600 s) loses the worker */
} ds4_remote_model;

/* The proxy backend over channel ch (owned by the backend from now on). */
int ds4_remote_backend_new(ds4_chan *ch, const ds4_remote_model *rm, ds4_backend *out, ds4_err *err);

/* True when be is a proxy whose worker is gone. */
bool ds4_remote_lost(const ds4_backend *be);

/* A worker's loop: creates its backend with make_backend on the first
 * bind, serves rank 0's ops until rank 0 closes the channel (0) or the
 * channel fails (DS4_E_IO). path overrides the model path rank 0 sends. */
typedef int (*ds4_backend_factory)(void *user, ds4_backend *out, ds4_err *err);
int ds4_worker_serve(ds4_chan *ch, const char *path, ds4_backend_factory make_backend, void *user, ds4_err *err);

#endif
