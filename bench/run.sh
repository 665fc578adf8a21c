#!/usr/bin/env bash
# relay's benchmark: the mock upstream directly, through nginx (a bare proxy hop, the reference)
# and through relay, on 127.0.0.1. The proxy under test runs on CPU 0; the mock and the load
# generator share CPU 1. Prints a Markdown table. Takes about three minutes.
#
#   bench/run.sh            # full run (10 s per measurement)
#   SECONDS_PER_RUN=3 bench/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DUR=${SECONDS_PER_RUN:-10}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
BASE_PORT=${BASE_PORT:-18000}
MOCK=$((BASE_PORT + 1)); PACED_MOCK=$((BASE_PORT + 2))
RELAY_PORT=$((BASE_PORT + 10)); PACED_RELAY_PORT=$((BASE_PORT + 11)); NGINX_PORT=$((BASE_PORT + 20))

command -v oha >/dev/null || cargo install oha --locked
command -v nginx >/dev/null || { apt-get update -qq && apt-get install -y -qq nginx-light; }
command -v taskset >/dev/null || { echo "taskset (util-linux) is needed" >&2; exit 1; }
cargo build --release --locked --bin relay --example stream_bench --example limiter_bench >&2
RELAY=$PWD/target/release/relay
SB=$PWD/target/release/examples/stream_bench
LB=$PWD/target/release/examples/limiter_bench
REDIS=${BENCH_REDIS_URL:-redis://127.0.0.1:6379/0}

TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT

wait_http() { for _ in $(seq 1 100); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done; echo "$1 did not answer" >&2; exit 1; }

# The mock: 20 chunks per stream, unpaced; and a paced one for the many-streams run.
taskset -c "$LOAD_CPU" "$RELAY" mock-upstream --port "$MOCK" --chunks 20 2>/dev/null & PIDS+=($!)
taskset -c "$LOAD_CPU" "$RELAY" mock-upstream --port "$PACED_MOCK" --chunks 20 --chunk-delay-ms 50 2>/dev/null & PIDS+=($!)

# Every relay shares one database, as replicas do: a token is only good where its user exists.
# They start one after another, so that only the first applies the migrations.
start_relay() { # port upstream-port log-level [redis-url [token-limit [metrics-enabled]]]
  (cd "$TMP" && exec env -i PATH="$PATH" HOST=127.0.0.1 PORT="$1" TOKEN_LIMIT="${5:-0}" TOKEN_LIMIT_WINDOW=1 \
    METRICS_ENABLED="${6:-true}" \
    SECRET_KEY=bench-secret-key-bench-secret-key-0123456789 OPENAI_API_KEY=sk-bench \
    OPENAI_BASE_URL="http://127.0.0.1:$2/v1" DATABASE_URL="sqlite://$TMP/relay.db" \
    REDIS_URL="${4:-}" RATE_LIMIT_KEY_PREFIX="bench-$$" \
    RATE_LIMIT_REQUESTS=1000000000 RATE_LIMIT_WINDOW=1 LOG_LEVEL="$3" \
    taskset -c "$PROXY_CPU" "$RELAY" serve 2>/dev/null) &
}
# The relay under test logs no line per request (like the nginx reference, access_log off);
# a second one logs its JSON line per request (the production default) for comparison.
start_relay "$RELAY_PORT" "$MOCK" warn; RELAY_PID=$!; PIDS+=($RELAY_PID)
wait_http "http://127.0.0.1:$RELAY_PORT/api/v1/health"
LOGGED_PORT=$((BASE_PORT + 12))
start_relay "$LOGGED_PORT" "$MOCK" info; LOGGED_PID=$!; PIDS+=($LOGGED_PID)
wait_http "http://127.0.0.1:$LOGGED_PORT/api/v1/health"
# A third one takes its rate-limit decisions in Redis (the others in memory).
REDIS_PORT_RELAY=$((BASE_PORT + 13))
start_relay "$REDIS_PORT_RELAY" "$MOCK" warn "$REDIS"; REDIS_RELAY_PID=$!; PIDS+=($REDIS_RELAY_PID)
wait_http "http://127.0.0.1:$REDIS_PORT_RELAY/api/v1/health"
# Two more with a token limit on (a huge one: nothing is refused, every request reserves and
# settles), in memory and in Redis.
TOKENS_PORT=$((BASE_PORT + 14)); TOKENS_REDIS_PORT=$((BASE_PORT + 15))
start_relay "$TOKENS_PORT" "$MOCK" warn "" 1000000000; TOKENS_PID=$!; PIDS+=($TOKENS_PID)
wait_http "http://127.0.0.1:$TOKENS_PORT/api/v1/health"
start_relay "$TOKENS_REDIS_PORT" "$MOCK" warn "$REDIS" 1000000000; TOKENS_REDIS_PID=$!; PIDS+=($TOKENS_REDIS_PID)
wait_http "http://127.0.0.1:$TOKENS_REDIS_PORT/api/v1/health"
# And one without metrics (METRICS_ENABLED=false), to weigh what recording them costs.
NOMETRICS_PORT=$((BASE_PORT + 16))
start_relay "$NOMETRICS_PORT" "$MOCK" warn "" 0 false; NOMETRICS_PID=$!; PIDS+=($NOMETRICS_PID)
wait_http "http://127.0.0.1:$NOMETRICS_PORT/api/v1/health"

cat > "$TMP/nginx.conf" <<NGINX
worker_processes 1;
worker_cpu_affinity $(printf '%0*d' $((PROXY_CPU + 1)) 1);
daemon off;
pid $TMP/nginx.pid;
error_log $TMP/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream mock { server 127.0.0.1:$MOCK; keepalive 256; }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
NGINX
taskset -c "$PROXY_CPU" nginx -c "$TMP/nginx.conf" -p "$TMP" 2>/dev/null & PIDS+=($!)

wait_http "http://127.0.0.1:$MOCK/v1/models"
wait_http "http://127.0.0.1:$RELAY_PORT/api/v1/health"
wait_http "http://127.0.0.1:$LOGGED_PORT/api/v1/health"
wait_http "http://127.0.0.1:$TOKENS_REDIS_PORT/api/v1/health"
wait_http "http://127.0.0.1:$NGINX_PORT/v1/models"

API="http://127.0.0.1:$RELAY_PORT/api/v1"
curl -s "$API/auth/register" -H 'content-type: application/json' \
  -d '{"email":"bench@example.com","password":"bench-password"}' >/dev/null
TOKEN=$(curl -s "$API/auth/login" -H 'content-type: application/json' \
  -d '{"email":"bench@example.com","password":"bench-password"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')

PLAIN='{"model":"mock-echo","messages":[{"role":"user","content":"hello from the benchmark"}]}'
STREAM='{"model":"mock-echo","stream":true,"messages":[{"role":"user","content":"hello from the benchmark"}]}'
DIRECT_URL="http://127.0.0.1:$MOCK/v1/chat/completions"
NGINX_URL="http://127.0.0.1:$NGINX_PORT/v1/chat/completions"
RELAY_URL="$API/chat/completions"

# oha, non-streaming: prints "p50_ms p99_ms requests_per_second requests".
oha_run() { # url connections
  taskset -c "$LOAD_CPU" oha -z "${DUR}s" -c "$2" --no-tui --output-format json -m POST \
    -H 'content-type: application/json' -H "authorization: Bearer $TOKEN" -d "$PLAIN" "$1" \
    | python3 -c '
import json, sys
r = json.load(sys.stdin)
lat = r["latencyPercentiles"]; s = r["summary"]
codes = r.get("statusCodeDistribution", {})
ok = int(codes.get("200", 0)); bad = sum(int(v) for k, v in codes.items() if k != "200")
bad += sum(int(v) for k, v in r.get("errorDistribution", {}).items() if "deadline" not in k)
print("%.3f %.3f %.0f %d %d" % (lat["p50"] * 1000, lat["p99"] * 1000, s["requestsPerSec"], ok, bad))'
}
sb_run() { # url connections [extra args]
  local url=$1 c=$2; shift 2
  taskset -c "$LOAD_CPU" "$SB" "$url" --connections "$c" --token "$TOKEN" "$@"
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }

# Warm up every path.
oha_run "$DIRECT_URL" 4 >/dev/null; oha_run "$RELAY_URL" 4 >/dev/null; oha_run "$NGINX_URL" 4 >/dev/null

echo "Non-streaming, 1 connection" >&2
read -r d50 d99 drps _ _ < <(oha_run "$DIRECT_URL" 1)
read -r n50 n99 nrps _ _ < <(oha_run "$NGINX_URL" 1)
read -r r50 r99 rrps _ rbad1 < <(oha_run "$RELAY_URL" 1)

echo "Non-streaming, 64 connections" >&2
read -r _ _ d64 _ _ < <(oha_run "$DIRECT_URL" 64)
read -r n64_50 n64_99 n64 _ _ < <(oha_run "$NGINX_URL" 64)
NGINX_WORKER=$(pgrep -f "nginx: worker" | head -n1)
t0=$(cpu_ticks "$RELAY_PID")
read -r r64_50 r64_99 r64 r64ok rbad64 < <(oha_run "$RELAY_URL" 64)
t1=$(cpu_ticks "$RELAY_PID")
HZ=$(getconf CLK_TCK)
relay_cpu=$(python3 -c "print('%.4f' % (($t1 - $t0) / $HZ * 1000 / max($r64ok, 1)))")
n0=$(cpu_ticks "$NGINX_WORKER")
read -r _ _ _ n64ok _ < <(oha_run "$NGINX_URL" 64)
n1=$(cpu_ticks "$NGINX_WORKER")
nginx_cpu=$(python3 -c "print('%.4f' % (($n1 - $n0) / $HZ * 1000 / max($n64ok, 1)))")

echo "Non-streaming, 64 connections, relay logging every request" >&2
LOGGED_URL="http://127.0.0.1:$LOGGED_PORT/api/v1/chat/completions"
oha_run "$LOGGED_URL" 4 >/dev/null
l0=$(cpu_ticks "$LOGGED_PID")
read -r l64_50 l64_99 l64 l64ok lbad64 < <(oha_run "$LOGGED_URL" 64)
l1=$(cpu_ticks "$LOGGED_PID")
logged_cpu=$(python3 -c "print('%.4f' % (($l1 - $l0) / $HZ * 1000 / max($l64ok, 1)))")

echo "Non-streaming, 64 connections, limits in Redis; and the limiter alone" >&2
REDIS_RELAY_URL="http://127.0.0.1:$REDIS_PORT_RELAY/api/v1/chat/completions"
oha_run "$REDIS_RELAY_URL" 4 >/dev/null
q0=$(cpu_ticks "$REDIS_RELAY_PID")
read -r rr50 rr99 rr64 rr64ok rrbad < <(oha_run "$REDIS_RELAY_URL" 64)
q1=$(cpu_ticks "$REDIS_RELAY_PID")
redis_cpu=$(python3 -c "print('%.4f' % (($q1 - $q0) / $HZ * 1000 / max($rr64ok, 1)))")
read -r rr1_50 _ _ _ _ < <(oha_run "$REDIS_RELAY_URL" 1)
limiter=$(taskset -c "$LOAD_CPU" "$LB" "$REDIS")
mem_p50=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['memory']['p50_us'])" "$limiter")
mem_mean=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['memory']['mean_us'])" "$limiter")
red_p50=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['redis']['p50_us'])" "$limiter")
red_p99=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['redis']['p99_us'])" "$limiter")

echo "Non-streaming, 64 connections, with a token limit (memory, then Redis)" >&2
cpu_per_request() { # pid url: "CPU-ms-per-request p50-ms"
  local a b p50 ok
  oha_run "$2" 4 >/dev/null
  a=$(cpu_ticks "$1")
  read -r p50 _ _ ok _ < <(oha_run "$2" 64)
  b=$(cpu_ticks "$1")
  python3 -c "print('%.4f %s' % (($b - $a) / $HZ * 1000 / max($ok, 1), '$p50'))"
}
read -r tok_cpu tok50 < <(cpu_per_request "$TOKENS_PID" "http://127.0.0.1:$TOKENS_PORT/api/v1/chat/completions")
read -r tokr_cpu tokr50 < <(cpu_per_request "$TOKENS_REDIS_PID" "http://127.0.0.1:$TOKENS_REDIS_PORT/api/v1/chat/completions")

echo "Non-streaming, 64 connections, an API key instead of the access token (JWT)" >&2
JWT=$TOKEN
KEY=$(curl -s "$API/auth/api-keys" -H 'content-type: application/json' -H "authorization: Bearer $JWT" \
  -d '{"name":"bench"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
# Alternated, twice each, in the same relay: the machine's drift hits both alike.
read -r jwt_cpu_a jwt50 < <(cpu_per_request "$RELAY_PID" "$RELAY_URL")
TOKEN=$KEY; read -r key_cpu_a key50 < <(cpu_per_request "$RELAY_PID" "$RELAY_URL"); TOKEN=$JWT
read -r jwt_cpu_b _ < <(cpu_per_request "$RELAY_PID" "$RELAY_URL")
TOKEN=$KEY; read -r key_cpu_b _ < <(cpu_per_request "$RELAY_PID" "$RELAY_URL"); TOKEN=$JWT
jwt_cpu=$(python3 -c "print('%.4f' % (($jwt_cpu_a + $jwt_cpu_b) / 2))")
key_cpu=$(python3 -c "print('%.4f' % (($key_cpu_a + $key_cpu_b) / 2))")

echo "Non-streaming, 64 connections, metrics on (the relay above) and off" >&2
NOMETRICS_URL="http://127.0.0.1:$NOMETRICS_PORT/api/v1/chat/completions"
read -r met_cpu_a _ < <(cpu_per_request "$RELAY_PID" "$RELAY_URL")
read -r nomet_cpu_a _ < <(cpu_per_request "$NOMETRICS_PID" "$NOMETRICS_URL")
read -r met_cpu_b _ < <(cpu_per_request "$RELAY_PID" "$RELAY_URL")
read -r nomet_cpu_b _ < <(cpu_per_request "$NOMETRICS_PID" "$NOMETRICS_URL")
met_cpu=$(python3 -c "print('%.4f' % (($met_cpu_a + $met_cpu_b) / 2))")
nomet_cpu=$(python3 -c "print('%.4f' % (($nomet_cpu_a + $nomet_cpu_b) / 2))")

echo "Streaming (20 chunks), 32 connections and time to first byte" >&2
s_nginx=$(sb_run "$NGINX_URL" 32 --seconds "$DUR" --body "$STREAM")
s_relay=$(sb_run "$RELAY_URL" 32 --seconds "$DUR" --body "$STREAM")
t_direct=$(sb_run "$DIRECT_URL" 1 --seconds "$DUR" --body "$STREAM")
t_nginx=$(sb_run "$NGINX_URL" 1 --seconds "$DUR" --body "$STREAM")
t_relay=$(sb_run "$RELAY_URL" 1 --seconds "$DUR" --body "$STREAM")

echo "1,000 concurrent streams paced 50 ms a chunk" >&2
start_relay "$PACED_RELAY_PORT" "$PACED_MOCK" info; PACED_PID=$!; PIDS+=($PACED_PID)
wait_http "http://127.0.0.1:$PACED_RELAY_PORT/api/v1/health"
curl -s "http://127.0.0.1:$PACED_RELAY_PORT/api/v1/auth/register" -H 'content-type: application/json' \
  -d '{"email":"bench@example.com","password":"bench-password"}' >/dev/null
TOKEN=$(curl -s "http://127.0.0.1:$PACED_RELAY_PORT/api/v1/auth/login" -H 'content-type: application/json' \
  -d '{"email":"bench@example.com","password":"bench-password"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
ulimit -n 65536 2>/dev/null || true
base_kib=$(awk '/VmRSS/ {print $2}' "/proc/$PACED_PID/status")
( while kill -0 "$PACED_PID" 2>/dev/null; do awk '/VmRSS/ {print $2}' "/proc/$PACED_PID/status"; sleep 0.1; done ) > "$TMP/rss.log" 2>/dev/null &
SAMPLER=$!
paced=$(sb_run "http://127.0.0.1:$PACED_RELAY_PORT/api/v1/chat/completions" 1000 --seconds "$DUR" --body "$STREAM")
kill "$SAMPLER" 2>/dev/null || true
rss_kib=$(sort -n "$TMP/rss.log" | tail -n1)
hwm_kib=$(awk '/VmHWM/ {print $2}' "/proc/$PACED_PID/status")

ratio() { python3 -c "print('%.2f' % ($1 / $2))"; }
sub() { python3 -c "print('%+.3f' % ($1 - $2))"; }

cat <<TABLE
| Measurement | direct to mock | nginx | relay | relay vs target |
|---|---|---|---|---|
| non-stream, 1 conn, p50 latency (ms) | $d50 | $n50 | $r50 | adds $(sub "$r50" "$d50") ms (target ≤ +0.25) |
| non-stream, 1 conn, p99 latency (ms) | $d99 | $n99 | $r99 | adds $(sub "$r99" "$d99") ms (target ≤ +0.6) |
| non-stream, 1 conn, requests/s | $drps | $nrps | $rrps | |
| non-stream, 64 conns, requests/s | $d64 | $n64 | $r64 | $(ratio "$r64" "$n64") × nginx (target ≥ 0.7) |
| non-stream, 64 conns, p50 / p99 (ms) | | $n64_50 / $n64_99 | $r64_50 / $r64_99 | |
| non-stream, 64 conns, proxy CPU per request (ms) | | $nginx_cpu | $relay_cpu | target ≤ 0.05 |
| same, relay writing its JSON log line per request: requests/s | | $n64 | $l64 | $(ratio "$l64" "$n64") × nginx |
| same, relay writing its JSON log line per request: CPU per request (ms) | | | $logged_cpu | |
| same, limits in Redis: CPU per request (ms) / p50 (ms) | | | $redis_cpu / $rr50 | |
| same, token limit on, memory: CPU per request (ms) / p50 (ms) | | | $tok_cpu / $tok50 | $(ratio "$tok_cpu" "$relay_cpu") × without (target ≤ 1.10) |
| same, token limit on, Redis: CPU per request (ms) / p50 (ms) | | | $tokr_cpu / $tokr50 | $(ratio "$tokr_cpu" "$redis_cpu") × without |
| same, metrics on vs off (METRICS_ENABLED=false): CPU per request (ms), mean of two each | | | $met_cpu vs $nomet_cpu | on $(ratio "$met_cpu" "$nomet_cpu") × off (target ≤ 1.03) |
| same, memory limits: access token (JWT) vs API key, CPU per request (ms), mean of two each | | | $jwt_cpu vs $key_cpu (p50 $jwt50 / $key50 ms) | key $(ratio "$key_cpu" "$jwt_cpu") × JWT (target ≤ 1.05) |
| stream 20 chunks, 32 conns, streams/s | | $(field "$s_nginx" per_second) | $(field "$s_relay" per_second) | $(ratio "$(field "$s_relay" per_second)" "$(field "$s_nginx" per_second)") × nginx (target ≥ 0.7) |
| stream, 1 conn, time to first byte p50 (ms) | $(field "$t_direct" ttfb_p50_ms) | $(field "$t_nginx" ttfb_p50_ms) | $(field "$t_relay" ttfb_p50_ms) | adds $(sub "$(field "$t_relay" ttfb_p50_ms)" "$(field "$t_direct" ttfb_p50_ms)") ms (target ≤ +0.3) |
| 1,000 streams paced 50 ms/chunk: ok / errors | | | $(field "$paced" ok) / $(field "$paced" errors) | target: 0 errors |
| 1,000 streams: relay peak RSS during the run (MiB) | | | $(python3 -c "print('%.1f' % ($rss_kib / 1024))") (idle before: $(python3 -c "print('%.1f' % ($base_kib / 1024))")) | target ≤ 64 |
| 1,000 streams: relay VmHWM since start (MiB) | | | $(python3 -c "print('%.1f' % ($hwm_kib / 1024))") | includes start-up and login hashing (argon2id uses 19 MiB per hash) |
| rate-limit decision, memory backend: mean / p50 (µs) | | | $mem_mean / $mem_p50 | target < 5 |
| rate-limit decision, Redis backend: p50 / p99 (µs) | | | $red_p50 / $red_p99 | target p50 < 150 (one round trip) |
| non-stream, 64 conns, limits in memory vs Redis: requests/s | | | $r64 vs $rr64 | |
| non-stream, 1 conn, limits in Redis: p50 (ms) | | | $rr1_50 | memory: $r50 |
| errors in the other relay runs | | | $((rbad1 + rbad64 + lbad64 + rrbad)) + $(field "$s_relay" errors) | |
TABLE
