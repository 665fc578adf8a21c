#!/usr/bin/env bash
# Many concurrent paced streams through one relay: errors, relay's peak and idle RSS, and the
# time from exec to its first answer.
#   bench/many-streams.sh                 9,900 streams (see STREAMS below), 20 s
#   STREAMS=2000 SECONDS_PER_RUN=10 bench/many-streams.sh
#
# Each stream holds two sockets in relay (the client's and the upstream's), so relay needs
# 2 × STREAMS file descriptors and a few more; the default stays under a hard limit of 20,000
# (this machine's, which a container cannot raise). The mock paces 20 chunks 50 ms apart, so
# each stream lasts about one second and every connection runs one stream after another.
set -euo pipefail
cd "$(dirname "$0")/.."
STREAMS=${STREAMS:-9900}
DUR=${SECONDS_PER_RUN:-20}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
MOCK=${MOCK_PORT:-18600}
PORT=${RELAY_PORT:-18601}
ulimit -n "$(ulimit -Hn)"
need=$((2 * STREAMS + 64))
if [ "$(ulimit -n)" -lt "$need" ]; then
  echo "relay needs $need file descriptors for $STREAMS streams; the limit is $(ulimit -n)" >&2
  exit 1
fi
cargo build --release --locked --bin relay --example stream_bench >&2
RELAY=$PWD/target/release/relay
SB=$PWD/target/release/examples/stream_bench
TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT

taskset -c "$LOAD_CPU" "$RELAY" mock-upstream --port "$MOCK" --chunks 20 --chunk-delay-ms 50 2>/dev/null &
PIDS+=($!)

# Start to first answer: from just before exec to the first answered health check, timed by
# one Python process that starts relay and polls it (and leaves it running).
read -r RELAY_PID first_answer_ms < <(cd "$TMP" && env -i PATH="$PATH" HOST=127.0.0.1 PORT="$PORT" \
  SECRET_KEY=bench-secret-key-bench-secret-key-0123456789 OPENAI_API_KEY=sk-bench \
  OPENAI_BASE_URL="http://127.0.0.1:$MOCK/v1" DATABASE_URL="sqlite://$TMP/relay.db" \
  RATE_LIMIT_REQUESTS=1000000000 RATE_LIMIT_WINDOW=1 LOG_LEVEL=info \
  python3 - "$PORT" taskset -c "$PROXY_CPU" "$RELAY" serve <<'PY'
import socket, subprocess, sys, time
port, cmd = int(sys.argv[1]), sys.argv[2:]
start = time.perf_counter()
log = open("relay.log", "w")
relay = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
while time.perf_counter() - start < 10:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET /api/v1/health HTTP/1.1\r\nhost: relay\r\nconnection: close\r\n\r\n")
            if s.recv(12).startswith(b"HTTP/1.1 200"):
                print(relay.pid, "%.1f" % ((time.perf_counter() - start) * 1000))
                sys.exit(0)
    except OSError:
        time.sleep(0.0005)
relay.kill()
sys.exit("relay did not answer within 10 s")
PY
)
[ -n "$RELAY_PID" ] || exit 1
PIDS+=($RELAY_PID)
# The process relay ends up as (env and taskset exec into it).
sleep 0.2
start_rss=$(awk '/VmRSS/ {print $2}' "/proc/$RELAY_PID/status")

api="http://127.0.0.1:$PORT/api/v1"
curl -sf "$api/auth/register" -H 'content-type: application/json' \
  -d '{"email":"bench@example.com","password":"bench-password"}' >/dev/null
TOKEN=$(curl -sf "$api/auth/login" -H 'content-type: application/json' \
  -d '{"email":"bench@example.com","password":"bench-password"}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
sleep 1
idle_rss=$(awk '/VmRSS/ {print $2}' "/proc/$RELAY_PID/status")

( while kill -0 "$RELAY_PID" 2>/dev/null; do
    awk '/VmRSS/ {print $2}' "/proc/$RELAY_PID/status"
    ls "/proc/$RELAY_PID/fd" | wc -l >>"$TMP/fds.log"
    sleep 0.1
  done ) >"$TMP/rss.log" 2>/dev/null &
SAMPLER=$!
STREAM='{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}'
result=$(taskset -c "$LOAD_CPU" "$SB" "$api/chat/completions" --connections "$STREAMS" \
  --seconds "$DUR" --token "$TOKEN" --body "$STREAM")
kill "$SAMPLER" 2>/dev/null || true
peak_rss=$(sort -n "$TMP/rss.log" | tail -n1)
peak_fds=$(sort -n "$TMP/fds.log" | tail -n1)
after_rss=$(awk '/VmRSS/ {print $2}' "/proc/$RELAY_PID/status")
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
mib() { python3 -c "print('%.1f' % ($1 / 1024))"; }

cat <<EOF
| $STREAMS concurrent paced streams, ${DUR} s | relay |
|---|---|
| streams ok / errors | $(field "$result" ok) / $(field "$result" errors) |
| relay peak RSS (MiB) | $(mib "$peak_rss") |
| relay peak open file descriptors | $peak_fds |
| relay RSS at start / idle after a login / after the run (MiB) | $(mib "$start_rss") / $(mib "$idle_rss") / $(mib "$after_rss") |
| exec to first answer (ms) | $first_answer_ms |
EOF
