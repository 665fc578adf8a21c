#!/usr/bin/env bash
# Instructions relay spends per unit of work, counted by callgrind (repeatable whatever else the
# machine does): relay under valgrind on CPU 1, the shared harness's mock and load generator on
# CPU 0; counters zeroed after a warm-up, dumped after the measured load.
#   bench/instructions.sh BINARY requests|redis|burst|paced [N]
# Needs ../shared/bench/setup.sh (the mock, stream-bench, oha) and valgrind; `redis` needs Redis
# on 127.0.0.1:6379. Prints the instructions per request (or stream).
set -euo pipefail
bin=$(realpath "$1"); what=$2
work=$(mktemp -d)
# shellcheck source=bench/alone.sh
source "$(dirname "$0")/alone.sh" valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" "$bin" serve
load() {
  case $what in
    requests|redis) taskset -c 0 oha --no-tui -n "$1" -c 16 -m POST -H "Authorization: Bearer $token" \
      -H 'Content-Type: application/json' -d "$body" "$url" >/dev/null ;;
    burst) taskset -c 0 "$bh/stream-bench" --url "$url" -H "Authorization: Bearer $token" -c 16 -n "$1" >/dev/null ;;
    paced) taskset -c 0 "$bh/stream-bench" --url "$url" -H "Authorization: Bearer $token" -c 32 -n "$1" \
      --model 'gpt-4o-mini@delay=5' >/dev/null ;;
    *) echo "requests, redis, burst or paced" >&2; exit 2 ;;
  esac
}
n=${3:-$(case $what in paced) echo 600 ;; burst) echo 2000 ;; *) echo 3000 ;; esac)}
load 300
sleep 1
callgrind_control -z "$rel" >/dev/null 2>&1
load "$n"
sleep 1.5
callgrind_control -d "$rel" >/dev/null 2>&1
sleep 0.5
total=0
for f in "$work"/cg.out.*; do
  t=$(callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1; exit}')
  total=$((total + ${t:-0}))
done
unit=request
case $what in burst|paced) unit=stream ;; esac
echo "$what: $((total / n)) instructions a $unit ($n measured, $bin)"
