#!/usr/bin/env bash
# with-ray-node.sh COMMAND [ARGS...]
#
# Runs COMMAND (normally `bioadapt serve ... --ray-address HOST:PORT ...`) on a node of the Ray cluster it names:
#
# 1. A Ray driver must run on a node of its cluster: ray.init(address="HOST:PORT") looks for a raylet on its own
#    host and gives up without one ("No node info found ..."). In a container of its own the service has none,
#    so this joins the container to the cluster first, as a node with no CPUs and no GPUs (it takes no work; the
#    model actors run on the Ray workers). Skipped for --ray-address auto / ray://... / none.
#    Ray's token authentication applies: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH)
#    to the cluster's values, as on every other node.
# 2. For `bioadapt serve` without --token, when HYPHA_JWT_SECRET (the Hypha server's JWT secret) is set, a
#    token for the service's user (BIOADAPT_SERVICE_USER, default "bioadapt") is minted and passed as --token.
set -euo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: with-ray-node.sh COMMAND [ARGS...]" >&2
    exit 2
fi

ray_address=""
has_token=false
previous=""
for arg in "$@"; do
    case "$arg" in
        --ray-address=*) ray_address="${arg#--ray-address=}" ;;
        --token|--token=*) has_token=true ;;
    esac
    if [ "$previous" = "--ray-address" ]; then ray_address="$arg"; fi
    previous="$arg"
done

case "$ray_address" in
    ""|auto|ray://*) ;;
    *)
        deadline=$(( $(date +%s) + ${RAY_JOIN_TIMEOUT_S:-180} ))
        until ray start --address="$ray_address" --num-cpus=0 --num-gpus=0 --disable-usage-stats; do
            if [ "$(date +%s)" -ge "$deadline" ]; then
                echo "with-ray-node.sh: could not join the Ray cluster at $ray_address (is the head up, and do" \
                     "RAY_AUTH_MODE / RAY_AUTH_TOKEN match its own?)" >&2
                exit 1
            fi
            echo "with-ray-node.sh: Ray head at $ray_address not ready, retrying in 5 s" >&2
            sleep 5
        done
        ;;
esac

if [ "${1:-}" = "bioadapt" ] && [ "${2:-}" = "serve" ] && ! $has_token && [ -n "${HYPHA_JWT_SECRET:-}" ]; then
    token="$(python "$(dirname "$0")/mint_token.py" "${BIOADAPT_SERVICE_USER:-bioadapt}" --days 365)"
    set -- "$@" --token "$token"
fi

exec "$@"
