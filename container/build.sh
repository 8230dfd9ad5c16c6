#!/usr/bin/env bash
# `make image`: builds the image from the Dockerfile as shipped, with whatever OCI builder this
# machine has, and leaves it as localhost/tracker-eval:$ACCELERATOR in local container storage and
# as an OCI archive build/tracker-eval-$ACCELERATOR.oci.tar.
#
#   docker (with a running engine)  docker build; the archive from `docker save`.
#   podman + buildah                podman build. Storage driver and isolation default to what works
#                                   in an unprivileged sandbox (vfs, chroot, no layer cache); set
#                                   STORAGE_DRIVER=overlay and BUILD_ISOLATION=oci on a normal host for
#                                   faster builds with a layer cache (BUILD_LAYERS=true|false).
#
# The base image is $PYTHON_IMAGE when set, else python:3.11-slim when it is in local storage or a
# registry answers, else a Debian base built here with debootstrap (container/debian_base.sh).
# Dependencies come from wheelhouse/ (`make wheelhouse`), so the build itself needs no package index.
set -euo pipefail
cd "$(dirname "$0")/.."

ACCELERATOR="${ACCELERATOR:-cpu}"
TAG="localhost/tracker-eval:${ACCELERATOR}"
ARCHIVE="build/tracker-eval-${ACCELERATOR}.oci.tar"
UPSTREAM_BASE="docker.io/library/python:3.11-slim"
LOCAL_BASE="localhost/tracker-eval-base:bookworm"
export STORAGE_DRIVER="${STORAGE_DRIVER:-vfs}"
BUILD_ISOLATION="${BUILD_ISOLATION:-chroot}"
# vfs copies the whole file system for every step it caches (26 of them): a build with nothing
# changed took 289 s, a cold one 414 s. Without layers it commits each stage once (cold: 252 s).
BUILD_LAYERS="${BUILD_LAYERS:-$([ "$STORAGE_DRIVER" = vfs ] && echo false || echo true)}"

say() { printf 'make image: %s\n' "$*" >&2; }
fail() { say "$*"; exit 2; }

if [ "$ACCELERATOR" != cpu ] && [ "$ACCELERATOR" != cuda12 ]; then
  fail "ACCELERATOR=$ACCELERATOR is not an image variant; use ACCELERATOR=cpu or ACCELERATOR=cuda12"
fi
start=$(date +%s)

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  builder=docker
elif command -v podman >/dev/null 2>&1 && why=$(podman --storage-driver "$STORAGE_DRIVER" info 2>&1 >/dev/null); then
  builder=podman
elif command -v podman >/dev/null 2>&1 && [ "$(id -u)" != 0 ]; then
  fail "podman cannot start as $(id -un) (rootless podman needs entries for this user in /etc/subuid and /etc/subgid); run as root, set up rootless podman, or use a host with a Docker engine"
elif command -v podman >/dev/null 2>&1; then
  fail "podman cannot start: $(printf '%s' "$why" | tail -n 1); fix that, or use a host with a Docker engine"
else
  fail "no OCI builder: install docker (with a running engine) or podman and buildah (Debian: apt-get install podman buildah debootstrap)"
fi

if ! ls wheelhouse/*.whl >/dev/null 2>&1; then
  fail "wheelhouse/ holds no wheels; run 'make wheelhouse' first (make image does)"
fi
mkdir -p build

podman_() { podman --storage-driver "$STORAGE_DRIVER" "$@"; }

if [ -n "${PYTHON_IMAGE:-}" ]; then
  base="$PYTHON_IMAGE"
elif [ "$builder" = docker ]; then
  base="$UPSTREAM_BASE"
elif podman_ image exists "$UPSTREAM_BASE" || timeout 60 podman_ pull -q "$UPSTREAM_BASE" >/dev/null 2>&1; then
  base="$UPSTREAM_BASE"
elif podman_ image exists "$LOCAL_BASE"; then
  base="$LOCAL_BASE"
else
  say "no registry answers for $UPSTREAM_BASE; building a Debian base with debootstrap"
  container/debian_base.sh "$LOCAL_BASE"
  base="$LOCAL_BASE"
fi
say "builder: $builder; base: $base; accelerator: $ACCELERATOR"

args=(--build-arg "PYTHON_IMAGE=$base" --build-arg "ACCELERATOR=$ACCELERATOR" -t "$TAG" .)
if [ "$builder" = docker ]; then
  docker build "${args[@]}"
  docker save -o "$ARCHIVE" "$TAG"
  bytes=$(docker image inspect --format '{{.Size}}' "$TAG")
else
  # --format docker keeps HEALTHCHECK, which the OCI image format has no field for.
  podman_ build --isolation "$BUILD_ISOLATION" --format docker --layers="$BUILD_LAYERS" "${args[@]}"
  rm -f "$ARCHIVE"
  podman_ save --format oci-archive -o "$ARCHIVE" "$TAG"
  bytes=$(podman_ image inspect --format '{{.Size}}' "$TAG")
fi
archive_bytes=$(stat -c %s "$ARCHIVE")
say "built $TAG in $(( $(date +%s) - start )) s: $(( bytes / 1000000 )) MB ($ARCHIVE: $(( archive_bytes / 1000000 )) MB)"
