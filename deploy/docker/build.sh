#!/usr/bin/env bash
# Builds the nxcache container image without any container registry: the release binary
# and the shared libraries `ldd` lists, on an empty (`scratch`) base. Users with a
# registry get the same image: nothing is pulled.
#
#   deploy/docker/build.sh            # image nxcache:local
#   NXCACHE_IMAGE=registry/nxcache:1.2.3 deploy/docker/build.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
image=${NXCACHE_IMAGE:-nxcache:local}
cd "$root"

cargo build --release --locked -p nxcache
bin=target/release/nxcache

# The root file system of the image, under target/ (the only part of the repository the
# build context sends, see .dockerignore).
rootfs=target/nxcache-image/rootfs
rm -rf target/nxcache-image
mkdir -p "$rootfs"/{usr/local/bin,etc,tmp} target/nxcache-image/data
chmod 1777 "$rootfs/tmp"
# Symbols stay (readable backtraces); the line tables kept for profiling do not.
strip --strip-debug -o "$rootfs/usr/local/bin/nxcache" "$bin"
chmod 0755 "$rootfs/usr/local/bin/nxcache"

# Every shared library the binary loads, the dynamic loader included, copied with its
# path (symlinks resolved).
mapfile -t libs < <(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
for lib in "${libs[@]}"; do
  cp --parents -L "$lib" "$rootfs"
done

# A non-root user (no shell: there is none in the image).
echo 'nxcache:x:10001:10001:nxcache:/data:/nonexistent' >"$rootfs/etc/passwd"
echo 'nxcache:x:10001:' >"$rootfs/etc/group"
echo 'hosts: files dns' >"$rootfs/etc/nsswitch.conf"

# What the Dockerfile checks first; kept in the image as /etc/nxcache-image.
printf 'nxcache %s, revision %s\n' "$("$bin" --version | awk '{ print $2 }')" \
  "$(git rev-parse HEAD 2>/dev/null || echo unknown)" >target/nxcache-image/made-by-deploy-docker-build.sh

docker build --file deploy/docker/Dockerfile --tag "$image" \
  --label "org.opencontainers.image.revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  --label "org.opencontainers.image.version=$("$bin" --version | awk '{ print $2 }')" \
  .
echo "built $image ($(du -sh "$rootfs" | cut -f1) root file system: ${#libs[@]} libraries + nxcache)"
