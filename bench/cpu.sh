#!/usr/bin/env bash
# relay's CPU time per request at 64 connections, user and system, from /proc: relay alone on
# CPU 1 (with its SQLite threads), the shared harness's mock and oha on CPU 0. For A/B runs of
# two binaries, alternated, on a machine too noisy for one run to tell them apart.
#   bench/cpu.sh BINARY [memory|redis] [REQUESTS]
# Needs ../shared/bench/setup.sh (the mock, oha); `redis` needs Redis on 127.0.0.1:6379.
set -euo pipefail
bin=$(realpath "$1"); what=${2:-memory}; n=${3:-40000}
# shellcheck source=bench/alone.sh
source "$(dirname "$0")/alone.sh" "$bin" serve
oha_run() {
  taskset -c 0 oha --no-tui -n "$1" -c 64 -m POST -H "Authorization: Bearer $token" \
    -H 'Content-Type: application/json' -d "$body" "$url"
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
