// A real relay binary in front of the real built-in mock upstream (`relay mock-upstream`), on
// free ports, for the Node clients' tests. Modelled on tests/python/conftest.py.
//
//   const relay = await startRelay({ RATE_LIMIT_CHAT_REQUESTS: '5' });
//   try { const token = await relay.newUser('a@example.com'); ... } finally { await relay.stop(); }
//
// The relay binary is $RELAY_BIN, else <repo>/target/debug/relay (built by `cargo test`).

import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, openSync, readFileSync, closeSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = resolve(fileURLToPath(new URL('.', import.meta.url)), '..', '..');
export const RELAY_BIN = process.env.RELAY_BIN || join(ROOT, 'target', 'debug', 'relay');
export const PASSWORD = 'password-123';
const SECRET = 'node-sdk-tests-secret-key-0123456789abcdef';

// Every child still running when this process ends (a crash, an uncaught error) is killed.
const running = new Set();
process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL');
});

/** A TCP port that was free a moment ago. */
export function freePort() {
  return new Promise((ok, fail) => {
    const server = createServer();
    server.unref();
    server.on('error', fail);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => ok(port));
    });
  });
}

function start(args, env, logPath) {
  const log = openSync(logPath, 'a');
  const child = spawn(RELAY_BIN, args, { env, cwd: env.RELAY_TEST_DIR, stdio: ['ignore', log, log] });
  closeSync(log);
  running.add(child);
  child.exited = new Promise((ok) => child.once('exit', (code, signal) => ok({ code, signal })));
  child.exited.then(() => running.delete(child));
  return child;
}

async function stopChild(child) {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
  await child.exited;
  clearTimeout(timer);
}

async function waitFor(url, child, name, timeoutMs = 30_000) {
  const deadline = Date.now() + timeoutMs;
  let exited = null;
  child.exited.then((how) => (exited = how));
  while (Date.now() < deadline) {
    if (exited) throw new Error(`${name} exited (${JSON.stringify(exited)}) before ${url} answered`);
    try {
      const res = await fetch(url, { signal: AbortSignal.timeout(1000) });
      await res.arrayBuffer();
      return;
    } catch {
      await new Promise((ok) => setTimeout(ok, 50));
    }
  }
  throw new Error(`${url} did not answer within ${timeoutMs} ms`);
}

async function postJson(url, body, expectStatus) {
  const res = await fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  const text = await res.text();
  if (res.status !== expectStatus) {
    throw new Error(`POST ${url}: expected ${expectStatus}, got ${res.status}: ${text}`);
  }
  return JSON.parse(text);
}

/**
 * Starts `relay mock-upstream` and `relay serve` with `extraEnv` on top of the test settings.
 * Returns `{ url, api, mockUrl, newUser(email) -> access token, stop() }`. On a failed start
 * both processes are killed, their log printed, and the temporary directory removed.
 */
export async function startRelay(extraEnv = {}) {
  if (!existsSync(RELAY_BIN)) throw new Error(`build relay first: ${RELAY_BIN} is missing`);
  const dir = mkdtempSync(join(tmpdir(), 'relay-node-'));
  const logPath = join(dir, 'relay.log');
  const children = [];
  const stop = async () => {
    await Promise.all(children.map(stopChild));
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    const [mockPort, relayPort] = [await freePort(), await freePort()];
    const baseEnv = { PATH: process.env.PATH ?? '', RELAY_TEST_DIR: dir };
    const mock = start(['mock-upstream', '--port', String(mockPort)], baseEnv, join(dir, 'mock.log'));
    children.push(mock);
    const env = {
      ...baseEnv,
      PORT: String(relayPort),
      SECRET_KEY: SECRET,
      OPENAI_API_KEY: 'sk-node-tests',
      OPENAI_BASE_URL: `http://127.0.0.1:${mockPort}/v1`,
      DEFAULT_MODEL: 'mock-echo',
      ALLOWED_MODELS: 'mock-echo,mock-embed,mock-error-429,mock-error-500',
      DATABASE_URL: `sqlite://${dir}/relay.db`,
      REDIS_URL: '',
      RATE_LIMIT_REQUESTS: '100000',
      LOG_LEVEL: 'warn',
      ...extraEnv,
    };
    const relay = start(['serve'], env, logPath);
    children.push(relay);
    const url = `http://127.0.0.1:${relayPort}`;
    const mockUrl = `http://127.0.0.1:${mockPort}`;
    await waitFor(`${mockUrl}/v1/models`, mock, 'relay mock-upstream');
    await waitFor(`${url}/api/v1/health`, relay, 'relay serve');
    const api = `${url}/api/v1`;
    const newUser = async (email) => {
      await postJson(`${api}/auth/register`, { email, password: PASSWORD }, 201);
      const login = await postJson(`${api}/auth/login`, { email, password: PASSWORD }, 200);
      return login.access_token;
    };
    return { url, api, mockUrl, newUser, stop, log: () => readFileSync(logPath, 'utf8') };
  } catch (err) {
    let log = '';
    try {
      log = readFileSync(logPath, 'utf8');
    } catch {}
    await stop();
    err.message += log ? `\n--- relay log ---\n${log}` : '';
    throw err;
  }
}
