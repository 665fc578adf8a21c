#!/usr/bin/env bash
# relay's CPU time per request at 64 connections, user and system, from /proc: relay alone on
# CPU 1 (with its SQLite threads), the shared harness's mock and oha on CPU 0. For A/B runs of
# two binaries, alternated, on a machine too noisy for one run to tell them apart.
#   bench/cpu.sh BINARY [memory|redis] [REQUESTS]
# Needs ../shared/bench/setup.sh (the mock, oha); `redis` needs Redis on 127.0.0.1:6379.
set -euo pipefail
bin=$(realpath "$1"); what=${2:-memory}; n=${3:-40000}
bh=${BENCH_HOME:-$HOME/.cache/relay-bench}/target/release
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
taskset -c 0 "$bh/mock-upstream" --port 18000 --threads 1 >/dev/null 2>&1 & pids+=($!)
export SECRET_KEY=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
export OPENAI_API_KEY=sk-bench DATABASE_URL=sqlite://$work/relay.db REDIS_URL=
export RATE_LIMIT_REQUESTS=1000000000 RATE_LIMIT_WINDOW=1 ACCESS_TOKEN_EXPIRE_MINUTES=600
export HOST=127.0.0.1 PORT=18300 LOG_LEVEL=warn OPENAI_BASE_URL=http://127.0.0.1:18000/v1
[ "$what" = redis ] && export REDIS_URL=redis://127.0.0.1:6379/13 RATE_LIMIT_KEY_PREFIX=cpu$RANDOM
(cd "$work" && exec taskset -c 1 "$bin" serve >"$work/log" 2>&1) & rel=$!; pids+=($rel)
for _ in $(seq 300); do curl -sf http://127.0.0.1:18300/api/v1/health >/dev/null && break; sleep 0.05; done
curl -sf -X POST http://127.0.0.1:18300/api/v1/auth/register -H 'Content-Type: application/json' \
  -d '{"email":"bench@example.com","password":"bench-password-1"}' >/dev/null
token=$(curl -sf -X POST http://127.0.0.1:18300/api/v1/auth/login -H 'Content-Type: application/json' \
  -d '{"email":"bench@example.com","password":"bench-password-1"}' | python3 -c 'import sys,json; print(json.load(sys.stdin)["access_token"])')
body='{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello and introduce yourself in one sentence."}],"temperature":0.7,"max_tokens":64}'
oha_run() {
  taskset -c 0 oha --no-tui -n "$1" -c 64 -m POST -H "Authorization: Bearer $token" \
    -H 'Content-Type: application/json' -d "$body" http://127.0.0.1:18300/api/v1/chat/completions
}
oha_run 2000 >/dev/null
sleep 0.5
before=$(awk '{print $14, $15}' "/proc/$rel/stat")
out=$(oha_run "$n")
after=$(awk '{print $14, $15}' "/proc/$rel/stat")
ok=$(echo "$out" | awk '/\[200\]/ {print $2}')
rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
python3 - "$before" "$after" "$n" "${ok:-0}" "$rps" "$what" <<'PY'
import os, sys
b, a = [list(map(int, x.split())) for x in sys.argv[1:3]]
n, ok, rps, what = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
t = os.sysconf("SC_CLK_TCK")
user, system = (a[0] - b[0]) / t / n * 1e6, (a[1] - b[1]) / t / n * 1e6
print(f"{what}: {user + system:.1f} µs of CPU a request (user {user:.1f}, system {system:.1f}); "
      f"{rps} requests/s; {ok} of {n} answered 200")
PY
