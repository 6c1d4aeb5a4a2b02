#!/usr/bin/env bash
# Lays out the root file system of the nxcache image from a release binary: the binary
# (debug sections stripped), every shared library it loads (as `ldd` lists them, with
# their paths), a passwd/group naming the unprivileged user, and an empty data directory.
# The image's runtime stage is `scratch` plus this tree, whichever way the binary was made:
# deploy/docker/build.sh runs this script on the host, the Dockerfile's builder stage in
# the Rust image.
#
#   deploy/docker/rootfs.sh BINARY OUT    # writes OUT/rootfs and OUT/data
set -euo pipefail
if (($# != 2)); then
  echo "usage: $0 BINARY OUT (writes OUT/rootfs and OUT/data)" >&2
  exit 2
fi
bin=$1
out=$2
if [[ ! -x $bin ]]; then
  echo "$0: $bin is not an executable file (build it with: cargo build --release -p nxcache)" >&2
  exit 2
fi

rootfs=$out/rootfs
rm -rf "$rootfs" "$out/data"
mkdir -p "$rootfs"/{usr/local/bin,etc,tmp} "$out/data"
chmod 1777 "$rootfs/tmp"
# Symbols stay (readable backtraces); the line tables kept for profiling do not.
strip --strip-debug -o "$rootfs/usr/local/bin/nxcache" "$bin"
chmod 0755 "$rootfs/usr/local/bin/nxcache"

# Every shared library the binary loads, the dynamic loader included, copied with its
# path (symlinks resolved). A statically linked binary has none.
mapfile -t libs < <(ldd "$bin" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
for lib in "${libs[@]}"; do
  cp --parents -L "$lib" "$rootfs"
done

# A non-root user (no shell: there is none in the image).
echo 'nxcache:x:10001:10001:nxcache:/data:/nonexistent' >"$rootfs/etc/passwd"
echo 'nxcache:x:10001:' >"$rootfs/etc/group"
echo 'hosts: files dns' >"$rootfs/etc/nsswitch.conf"

echo "root file system in $rootfs: nxcache and ${#libs[@]} libraries, $(du -sh "$rootfs" | cut -f1)"
