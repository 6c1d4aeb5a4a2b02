#!/usr/bin/env bash
# Builds the nxcache image from a release binary made on this machine: the Dockerfile's
# `prebuilt` target, which compiles nothing and pulls nothing (for machines that cannot
# pull the Rust builder image; elsewhere `docker compose up --build` builds from source).
#
#   deploy/docker/build.sh                      # cargo build --release, then image nxcache:local
#   deploy/docker/build.sh target/release/nxcache   # pack this binary, no cargo at all
#   NXCACHE_IMAGE=registry/nxcache:1.2.3 deploy/docker/build.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
image=${NXCACHE_IMAGE:-nxcache:local}
if (($# > 1)); then
  echo "usage: $0 [RELEASE_BINARY]" >&2
  exit 2
elif (($# == 1)); then
  bin=$(realpath -m "$1")
fi
cd "$root"

if ! docker version >/dev/null 2>&1; then
  echo "$0: no Docker engine answers (docker version failed); the image needs one" >&2
  exit 1
fi

if (($# == 0)); then
  cargo build --release --locked -p nxcache
  bin=target/release/nxcache
fi

# The only part of target/ in the build context (see .dockerignore).
out=target/nxcache-image
rm -rf "$out"
deploy/docker/rootfs.sh "$bin" "$out"

version=$("$bin" --version | awk '{ print $2 }')
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# What the `prebuilt` target copies first, so that a build without this script stops
# naming it; kept in the image as /etc/nxcache-image.
printf 'nxcache %s, revision %s, packed by deploy/docker/build.sh\n' "$version" "$revision" \
  >"$out/made-by-deploy-docker-build.sh"

docker build --file deploy/docker/Dockerfile --target prebuilt --tag "$image" \
  --label "org.opencontainers.image.revision=$revision" \
  --label "org.opencontainers.image.version=$version" \
  .
echo "built $image from $bin"
