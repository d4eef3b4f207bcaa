#!/usr/bin/env bash
# Work pools for clipbatch. Run once against your Prefect API (PREFECT_API_URL).
#
#   deployments/setup-work-pools.sh            # local process pool only
#   deployments/setup-work-pools.sh docker     # + GPU docker pool
#   deployments/setup-work-pools.sh kubernetes # + GPU kubernetes pool
#
# GPU slots stay bounded by the server, whatever the number of workers:
#   - clipbatch-local: the `default` queue's concurrency limit (GPU_SLOTS); the backfill
#     runs from the `control` queue, so its waiting never takes a GPU slot;
#   - the GPU pools: the pool's concurrency limit (GPU_SLOTS).
# Each worker's `--limit N` bounds its flow-run processes on top of that.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
GPU_SLOTS="${GPU_SLOTS:-1}"
LOCAL_POOL="${CLIPBATCH_LOCAL_POOL:-clipbatch-local}"

create_pool() {  # name type [base-job-template]
    local name="$1" type="$2" template="${3:-}"
    local args=(--type "$type")
    [[ -n "$template" ]] && args+=(--base-job-template "$template")
    if prefect work-pool inspect "$name" >/dev/null 2>&1; then
        # Keep the pool (and its queues and runs); refresh its template.
        [[ -n "$template" ]] && prefect work-pool update "$name" --base-job-template "$template"
    else
        prefect work-pool create "$name" "${args[@]}"
    fi
}

create_pool "$LOCAL_POOL" process
# Embedding runs use the `default` queue (one per GPU slot); the backfill uses `control`.
prefect work-queue set-concurrency-limit default "$GPU_SLOTS" --pool "$LOCAL_POOL"

case "${1:-}" in
    docker)
        create_pool clipbatch-gpu-docker docker "$here/docker-gpu-job-template.json"
        prefect work-pool set-concurrency-limit clipbatch-gpu-docker "$GPU_SLOTS"
        ;;
    kubernetes)
        create_pool clipbatch-gpu-k8s kubernetes "$here/kubernetes-gpu-job-template.json"
        prefect work-pool set-concurrency-limit clipbatch-gpu-k8s "$GPU_SLOTS"
        ;;
    "") ;;
    *) echo "usage: $0 [docker|kubernetes]" >&2; exit 2 ;;
esac

cat <<MSG
Work pools ready. Next:
  prefect deploy --all --prefect-file deployments/prefect.yaml   # add --pool for a GPU pool
  CLIPBATCH_HOME=\$PWD prefect worker start --pool $LOCAL_POOL --limit 3
  # GPU box: prefect worker start --pool clipbatch-gpu-docker --limit <number of GPUs>
MSG
