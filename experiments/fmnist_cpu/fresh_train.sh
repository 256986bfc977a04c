#!/usr/bin/env bash
# usage: fresh_train.sh <branch> <dir>: a fresh clone of <branch> of this repository, make train, timestamped log
set -u
branch=$1; dir=$2
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
rm -rf "$dir"; git clone -q -b "$branch" "$repo" "$dir" && cd "$dir" || exit 1
echo "$(date +%T) clone of $(git rev-parse --short HEAD) ($branch); $(lscpu | grep 'Model name' | sed 's/  */ /g')"
start=$(date +%s)
make train 2>&1 | while IFS= read -r l; do printf '%s %s\n' "$(date +%T)" "$l"; done
rc=${PIPESTATUS[0]}
echo "$(date +%T) make train exit $rc after $(( $(date +%s) - start )) s"
