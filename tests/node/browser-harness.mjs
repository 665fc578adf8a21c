// What the browser tests stand on: the relay binary in front of its built-in mock upstream
// (`relay mock-upstream`, whose `mock-echo` model echoes the last user message), a tiny static
// server for test pages, esbuild for bundling npm packages into a page, and Debian's chromium.

import { spawn } from 'node:child_process';
import { access, constants, mkdtemp, rm } from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';

import * as esbuild from 'esbuild';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '../..');

/** The relay binary: `RELAY_BIN`, else the debug build of this repository. */
export const RELAY_BIN = process.env.RELAY_BIN ?? path.join(ROOT, 'target/debug/relay');

/** Debian's chromium (`apt-get install chromium`); never a browser downloaded by playwright. */
export const CHROMIUM = process.env.CHROMIUM_BIN ?? '/usr/bin/chromium';

/** Launch options for playwright-core's `chromium.launch`. */
export const LAUNCH = {
  executablePath: CHROMIUM,
  // The tests run as root in CI, where Chromium's sandbox cannot start.
  args: ['--no-sandbox'],
};

export const PASSWORD = 'password-123';

// Every child still running when this process exits is killed, even after a crash.
const children = new Set();
process.on('exit', () => {
  for (const child of children) child.kill('SIGKILL');
});

async function freePort() {
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** Runs `RELAY_BIN args`, keeping its stderr for the error message if it fails to start. */
function start(args, options = {}) {
  const child = spawn(RELAY_BIN, args, { ...options, stdio: ['ignore', 'ignore', 'pipe'] });
  children.add(child);
  child.log = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (text) => {
    child.log = (child.log + text).slice(-20_000);
  });
  child.on('exit', () => children.delete(child));
  return child;
}

async function stop(child) {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGTERM');
  const killer = setTimeout(() => child.kill('SIGKILL'), 10_000);
  await exited;
  clearTimeout(killer);
}

/** Waits until `url` answers at all (any status), or fails if `child` exits or 30 s pass. */
async function waitFor(url, child) {
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) {
      throw new Error(`${child.spawnargs.join(' ')} exited with ${child.exitCode}:\n${child.log}`);
    }
    try {
      await fetch(url);
      return;
    } catch {
      await sleep(50);
    }
  }
  throw new Error(`${url} did not answer:\n${child.log}`);
}

/**
 * Starts the mock upstream and `relay serve` on free ports, with a fresh SQLite database and
 * the playground on; `allowedOrigins` becomes `ALLOWED_ORIGINS`. Returns `{base, api, stop}`.
 */
export async function startRelay({ allowedOrigins, env = {} }) {
  await access(RELAY_BIN, constants.X_OK).catch(() => {
    throw new Error(`build relay first (cargo build), or set RELAY_BIN: ${RELAY_BIN} is missing`);
  });
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'relay-browser-'));
  const [mockPort, relayPort] = [await freePort(), await freePort()];
  const mock = start(['mock-upstream', '--port', String(mockPort)]);
  const relay = start(['serve'], {
    cwd: tmp,
    env: {
      PATH: process.env.PATH,
      PORT: String(relayPort),
      SECRET_KEY: 'browser-tests-secret-key-0123456789abcdef',
      OPENAI_API_KEY: 'sk-browser-tests',
      OPENAI_BASE_URL: `http://127.0.0.1:${mockPort}/v1`,
      DEFAULT_MODEL: 'mock-echo',
      DATABASE_URL: `sqlite://${tmp}/relay.db`,
      REDIS_URL: '',
      ALLOWED_ORIGINS: allowedOrigins.join(','),
      PLAYGROUND: 'true',
      RATE_LIMIT_REQUESTS: '1000',
      LOG_LEVEL: 'warn',
      ...env,
    },
  });
  const base = `http://127.0.0.1:${relayPort}`;
  const stopAll = async () => {
    await Promise.all([stop(relay), stop(mock)]);
    await rm(tmp, { recursive: true, force: true });
  };
  try {
    await waitFor(`http://127.0.0.1:${mockPort}/v1/models`, mock);
    await waitFor(`${base}/api/v1/health`, relay);
  } catch (error) {
    await stopAll();
    throw error;
  }
  return { base, api: `${base}/api/v1`, stop: stopAll };
}

/** Registers `email` (with `PASSWORD`) and logs in, from Node; returns the access token. */
export async function accessToken(api, email) {
  const post = (path, body) =>
    fetch(`${api}${path}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });
  const registered = await post('/auth/register', { email, password: PASSWORD });
  if (registered.status !== 201) throw new Error(`register: ${registered.status} ${await registered.text()}`);
  const login = await post('/auth/login', { email, password: PASSWORD });
  if (login.status !== 200) throw new Error(`login: ${login.status} ${await login.text()}`);
  return (await login.json()).access_token;
}

/** Bundles the module at `entry` (relative to this directory) for a browser, as ESM text. */
export async function bundle(entry) {
  const result = await esbuild.build({
    entryPoints: [path.join(HERE, entry)],
    bundle: true,
    platform: 'browser',
    format: 'esm',
    write: false,
    logLevel: 'silent',
  });
  return result.outputFiles[0].text;
}

/**
 * Serves `files` (`{'/path': {type, body}}`) on 127.0.0.1 at a free port, as a page's origin.
 * Returns `{origin, close}`.
 */
export async function serveFiles(files) {
  const server = http.createServer((req, res) => {
    const file = files[new URL(req.url, 'http://x').pathname];
    if (!file) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { 'content-type': file.type, 'cache-control': 'no-store' }).end(file.body);
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    origin: `http://127.0.0.1:${server.address().port}`,
    close: () => {
      server.closeAllConnections();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}
