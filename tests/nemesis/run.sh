#!/usr/bin/env bash
# The nemesis suite (docs/reliability.md): builds nxcache and the runner, then runs the
# cluster on its own test hosts under a seeded fault schedule and checks the history.
#
#   tests/nemesis/run.sh --minutes N --seed S [--nodes K] [--faults LIST] [--release]
#   tests/nemesis/run.sh --ci            # several seeds, about 6 minutes in all
#
# Needs root (network namespaces, nft, tc, mount). Every other option goes to
# `nxcache-nemesis run` (see `--help`). Exit: 0 every check held, 1 violations (the seed,
# schedule, history and a replay command are printed), 2 the suite itself failed.
set -euo pipefail
cd "$(dirname "$0")/../.."

profile=debug
args=()
for arg in "$@"; do
  case $arg in
    --release) profile=release ;;
    *) args+=("$arg") ;;
  esac
done
if (($(id -u) != 0)); then
  echo "the nemesis suite needs root (network namespaces, nft, tc, mount): sudo $0 $*" >&2
  exit 2
fi
for tool in ip nft tc mount; do
  command -v "$tool" >/dev/null || { echo "missing $tool (iproute2, nftables, util-linux)" >&2; exit 2; }
done
build=(cargo build --quiet -p nxcache --bin nxcache -p nxcache-nemesis --bin nxcache-nemesis)
[[ $profile == release ]] && build+=(--release)
"${build[@]}"
target=${CARGO_TARGET_DIR:-target}
exec "$target/$profile/nxcache-nemesis" run --bin "$target/$profile/nxcache" "${args[@]}"
