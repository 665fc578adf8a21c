#!/usr/bin/env bash
# Instructions relay spends per unit of work, counted by callgrind (repeatable whatever else the
# machine does): relay under valgrind on CPU 1, the shared harness's mock and load generator on
# CPU 0; counters zeroed after a warm-up, dumped after the measured load.
#   bench/instructions.sh BINARY requests|redis|burst|paced [N]
# Needs ../shared/bench/setup.sh (the mock, stream-bench, oha) and valgrind; `redis` needs Redis
# on 127.0.0.1:6379. Prints the instructions per request (or stream).
set -euo pipefail
bin=$(realpath "$1"); what=$2
bh=${BENCH_HOME:-$HOME/.cache/relay-bench}/target/release
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
taskset -c 0 "$bh/mock-upstream" --port 18000 --threads 1 >/dev/null 2>&1 & pids+=($!)
export SECRET_KEY=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
export OPENAI_API_KEY=sk-bench DATABASE_URL=sqlite://$work/relay.db REDIS_URL=
export RATE_LIMIT_REQUESTS=1000000000 RATE_LIMIT_WINDOW=1 ACCESS_TOKEN_EXPIRE_MINUTES=600
export HOST=127.0.0.1 PORT=18300 LOG_LEVEL=warn OPENAI_BASE_URL=http://127.0.0.1:18000/v1
[ "$what" = redis ] && export REDIS_URL=redis://127.0.0.1:6379/13 RATE_LIMIT_KEY_PREFIX=ins$RANDOM
(cd "$work" && exec taskset -c 1 valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" "$bin" serve >"$work/log" 2>&1) & rel=$!; pids+=($rel)
for _ in $(seq 300); do curl -sf http://127.0.0.1:18300/api/v1/health >/dev/null && break; sleep 0.1; done
curl -sf -X POST http://127.0.0.1:18300/api/v1/auth/register -H 'Content-Type: application/json' \
  -d '{"email":"bench@example.com","password":"bench-password-1"}' >/dev/null
token=$(curl -sf -X POST http://127.0.0.1:18300/api/v1/auth/login -H 'Content-Type: application/json' \
  -d '{"email":"bench@example.com","password":"bench-password-1"}' | python3 -c 'import sys,json; print(json.load(sys.stdin)["access_token"])')
url=http://127.0.0.1:18300/api/v1/chat/completions
# The shared harness's request.
body='{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello and introduce yourself in one sentence."}],"temperature":0.7,"max_tokens":64}'
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
