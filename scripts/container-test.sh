#!/usr/bin/env bash
# The podman commands tests/test_container.py runs and docs/docker.md quotes (keep them in step:
# tests/test_deploy.py checks that every podman command here appears in the docs).
#
#   scripts/container-test.sh base     make the local Debian base image once (cached)
#   scripts/container-test.sh build    build $IMAGE from deploy/Dockerfile
#   scripts/container-test.sh run      start $NAME: gRPC on 127.0.0.1:$GRPC_PORT, metrics on
#                                      127.0.0.1:$METRICS_PORT, state in volume $VOLUME
#   scripts/container-test.sh run-group  the same, the server a torchrun group of $NPROC ranks
#   scripts/container-test.sh health   run the image's HEALTHCHECK now (exit 0: healthy)
#   scripts/container-test.sh stop     SIGTERM, wait up to $GRACE s, print the exit code
#   scripts/container-test.sh remove   remove $NAME and $VOLUME
#
# Settings come from the environment; the defaults are below.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${IMAGE:-localhost/gradserve:dev}"
BASE_IMAGE="${BASE_IMAGE:-localhost/gradserve-base:bookworm}"
WHEELS="${WHEELS:-/opt/wheels}"                          # holds torch-2.13.0+cpu-cp311-...whl
HOST_CA="${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}" # the CA bundle pip must trust
NAME="${NAME:-gradserve}"
VOLUME="${VOLUME:-gradserve-state}"
GRPC_PORT="${GRPC_PORT:-50051}"
METRICS_PORT="${METRICS_PORT:-9464}"
GRACE="${GRACE:-30}"
NPROC="${NPROC:-2}"

case "${1:-}" in
base)
    scripts/container-base.sh "$BASE_IMAGE"
    ;;
build)
    podman build --isolation chroot --format docker \
        --build-arg BASE_IMAGE="$BASE_IMAGE" \
        --build-arg TORCH_SPEC=torch==2.13.0+cpu --build-arg TORCH_INDEX_URL= \
        -v "$WHEELS":/wheels:ro \
        -v "$HOST_CA":/host-ca.crt:ro --build-arg PIP_CERT=/host-ca.crt \
        -f deploy/Dockerfile -t "$IMAGE" .
    ;;
run)
    podman run -d --name "$NAME" --runtime runc --read-only --tmpfs /tmp \
        --ulimit nofile=20000:20000 --ulimit nproc=32768:32768 \
        -p 127.0.0.1:"$GRPC_PORT":50051 -p 127.0.0.1:"$METRICS_PORT":9464 \
        -v "$VOLUME":/var/lib/gradserve \
        "$IMAGE"
    ;;
run-group)
    podman run -d --name "$NAME" --runtime runc --read-only --tmpfs /tmp \
        --ulimit nofile=20000:20000 --ulimit nproc=32768:32768 \
        -p 127.0.0.1:"$GRPC_PORT":50051 -p 127.0.0.1:"$METRICS_PORT":9464 \
        -v "$VOLUME":/var/lib/gradserve \
        --entrypoint torchrun "$IMAGE" --standalone --nproc-per-node "$NPROC" -m gradserve_server
    ;;
health)
    podman healthcheck run "$NAME"
    ;;
stop)
    podman stop -t "$GRACE" "$NAME" >/dev/null
    podman inspect --format '{{.State.ExitCode}}' "$NAME"
    ;;
remove)
    podman rm -f "$NAME" >/dev/null
    podman volume rm -f "$VOLUME" >/dev/null
    ;;
*)
    echo "usage: $0 base|build|run|run-group|health|stop|remove (settings: see the top of this" \
        "script)" >&2
    exit 2
    ;;
esac
