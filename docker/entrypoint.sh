#!/usr/bin/env bash
# clipbatch container entrypoint.
#   worker  (default): wait for the Prefect API, make sure the work pool exists, optionally
#           apply deployments/prefect.yaml, then run a process worker on this (GPU) box.
#   anything else: run it as given (docker and kubernetes work pools start flow-run
#           containers from this image with their own command).
set -euo pipefail

if [[ "${1:-worker}" != "worker" ]]; then
    exec "$@"
fi

: "${PREFECT_API_URL:?set PREFECT_API_URL, e.g. http://prefect-server:4200/api}"
pool="${CLIPBATCH_WORK_POOL:-clipbatch-local}"
limit="${CLIPBATCH_WORKER_LIMIT:-8}"

for _ in $(seq 1 60); do
    curl -fsS "${PREFECT_API_URL%/}/health" >/dev/null 2>&1 && break
    sleep 2
done
curl -fsS "${PREFECT_API_URL%/}/health" >/dev/null || { echo "Prefect API not reachable at $PREFECT_API_URL" >&2; exit 1; }

prefect work-pool inspect "$pool" >/dev/null 2>&1 || prefect work-pool create "$pool" --type process
# Embedding runs come from the `default` queue: one per GPU. The `control` queue (backfills,
# index builds) is unbounded there; the worker's --limit bounds processes overall.
prefect work-queue set-concurrency-limit default "${CLIPBATCH_GPU_SLOTS:-1}" --pool "$pool"
if [[ "${CLIPBATCH_DEPLOY_ON_START:-0}" == "1" ]]; then
    (cd "${CLIPBATCH_HOME:-/opt/clipbatch}" && prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml)
fi

# Stopping (docker stop, kubectl delete): what Prefect's process worker honours is SIGINT.
# Measured with Prefect 3.9.1, idle or with a flow run going, direct or behind tini: SIGINT
# and SIGTERM both end it in under a second, flow-run processes included, because its
# SIGTERM handler only sends SIGINT to itself, and its SIGINT handler puts back the
# disposition SIGINT had when the worker started and raises it again. A worker that
# started with SIGINT ignored (bash's background jobs, nohup-like launchers) therefore
# logs "Received SIGTERM. Sending SIGINT ..." and runs on until SIGKILL: the issue's
# slow docker stop. So this script, not the signal docker sends, decides:
#   - the worker runs in the background with SIGINT back to its default (`env
#     --default-signal` also undoes an ignore this script inherited, which bash can't);
#   - on SIGTERM or SIGINT it sends the worker SIGINT and waits until the worker and its
#     flow-run processes (each in its own session, so no group signal reaches them) are
#     gone, for at most CLIPBATCH_STOP_TIMEOUT seconds (8: docker's grace period is 10),
#     then SIGKILLs whatever is left. A second signal skips the wait. The worker ends
#     its flow runs without waiting for them (they stay Running in the API); clipbatch's
#     runs are resumable, so a later run picks up what they had not committed.
#   - exit status: the worker's own (0 after a clean stop), or 128+signal (143 for
#     SIGTERM) when it had to be killed.
# compose's stop_signal would not help: SIGTERM and SIGINT end the worker the same way.
stop_timeout="${CLIPBATCH_STOP_TIMEOUT:-8}"
worker=""

alive() {  # a process that exists and is not a zombie
    local stat
    { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
    stat=${stat##*") "}
    [[ ${stat%% *} != Z ]]
}

descendants() {  # every process below $1, from /proc (no procps in the image)
    local -A kids=()
    local stat pid rest queue=("$1") out=() p c
    for stat in /proc/[0-9]*/stat; do
        { read -r rest <"$stat"; } 2>/dev/null || continue
        pid=${rest%% *}
        rest=${rest##*") "}  # state ppid ...
        rest=${rest#* }
        kids[${rest%% *}]+="$pid "
    done
    while ((${#queue[@]})); do
        p=${queue[0]}
        queue=("${queue[@]:1}")
        for c in ${kids[$p]:-}; do
            out+=("$c")
            queue+=("$c")
        done
    done
    echo "${out[*]}"
}

stop_worker() {
    set +e
    local signame=$1 signum procs p left deadline
    signum=$(kill -l "$signame")
    [[ -n $worker ]] || exit $((128 + signum))
    deadline=$((SECONDS + stop_timeout))
    trap 'deadline=0' TERM INT
    procs="$worker $(descendants "$worker")"  # before anything is reparented
    echo "clipbatch-entrypoint: SIG$signame: sending SIGINT to the worker (PID $worker), SIGKILL after ${stop_timeout}s" >&2
    kill -INT "$worker" 2>/dev/null
    while ((SECONDS < deadline)); do
        left=""
        for p in $procs; do alive "$p" && left+="$p "; done
        [[ -n $left ]] || break
        sleep 0.2
    done
    local -A left_set=()
    for p in $procs $(descendants "$worker"); do alive "$p" && left_set[$p]=1; done
    if ((${#left_set[@]})); then
        echo "clipbatch-entrypoint: not stopped in time, SIGKILL: ${!left_set[*]}" >&2
        kill -KILL "${!left_set[@]}" 2>/dev/null
        wait "$worker" 2>/dev/null
        exit $((128 + signum))
    fi
    wait "$worker"
    exit $?
}
trap 'stop_worker TERM' TERM
trap 'stop_worker INT' INT

reset_signals=()
env --default-signal=INT true 2>/dev/null && reset_signals=(env --default-signal=INT)
# --limit bounds flow-run processes on this box: GPU slots plus room for backfill runs.
(
    trap - INT
    exec "${reset_signals[@]}" prefect worker start --pool "$pool" --type process --limit "$limit"
) &
worker=$!
wait "$worker"
