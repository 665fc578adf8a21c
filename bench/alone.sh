# Sourced by bench/cpu.sh and bench/instructions.sh: the shared harness's mock on CPU 0, and
# relay (started by the command given as arguments, in a scratch folder) alone on CPU 1, with a
# user and a token. Sets bh (the harness's binaries), work (the scratch folder, made unless set,
# removed at exit), rel (relay's pid), url (the chat endpoint), token and body (the harness's
# request). `what=redis` before sourcing gives relay Redis limits.
bh=${BENCH_HOME:-$HOME/.cache/relay-bench}/target/release
work=${work:-$(mktemp -d)}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
taskset -c 0 "$bh/mock-upstream" --port 18000 --threads 1 >/dev/null 2>&1 & pids+=($!)
SECRET_KEY=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
export SECRET_KEY OPENAI_API_KEY=sk-bench DATABASE_URL=sqlite://$work/relay.db REDIS_URL=
export RATE_LIMIT_REQUESTS=1000000000 RATE_LIMIT_WINDOW=1 ACCESS_TOKEN_EXPIRE_MINUTES=600
export HOST=127.0.0.1 PORT=18300 LOG_LEVEL=warn OPENAI_BASE_URL=http://127.0.0.1:18000/v1
if [ "${what:-}" = redis ]; then
  export REDIS_URL=redis://127.0.0.1:6379/13 RATE_LIMIT_KEY_PREFIX=bench$RANDOM
fi
(cd "$work" && exec taskset -c 1 "$@" >"$work/log" 2>&1) & rel=$!
pids+=("$rel")
for _ in $(seq 300); do curl -sf http://127.0.0.1:18300/api/v1/health >/dev/null && break; sleep 0.1; done
curl -sf -X POST http://127.0.0.1:18300/api/v1/auth/register -H 'Content-Type: application/json' \
  -d '{"email":"bench@example.com","password":"bench-password-1"}' >/dev/null
token=$(curl -sf -X POST http://127.0.0.1:18300/api/v1/auth/login -H 'Content-Type: application/json' \
  -d '{"email":"bench@example.com","password":"bench-password-1"}' | python3 -c 'import sys,json; print(json.load(sys.stdin)["access_token"])')
url=http://127.0.0.1:18300/api/v1/chat/completions
body='{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello and introduce yourself in one sentence."}],"temperature":0.7,"max_tokens":64}'
