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
limit="${CLIPBATCH_WORKER_LIMIT:-4}"

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

# --limit bounds flow-run processes on this box: GPU slots plus room for backfill runs.
exec prefect worker start --pool "$pool" --type process --limit "$limit"
