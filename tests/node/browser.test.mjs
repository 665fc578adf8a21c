// relay from a real browser (Debian's headless chromium, driven by playwright-core): the
// official `openai` npm SDK bundled into a page streams from an allowed origin and is blocked
// from any other; the playground page relay serves logs in, streams with both APIs, refreshes
// an expired token, and shows a failed stream as one.
//
// Run: cd tests/node && npm ci && RELAY_BIN=<path to relay> node --test browser.test.mjs

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { chromium } from 'playwright-core';

import { LAUNCH, PASSWORD, accessToken, bundle, serveFiles, startRelay } from './browser-harness.mjs';

const SDK_PAGE = {
  '/': {
    type: 'text/html; charset=utf-8',
    body: '<!doctype html><meta charset="utf-8"><title>openai SDK</title><script type="module" src="/sdk.js"></script>',
  },
};

let relay;
let allowed; // a page origin listed in ALLOWED_ORIGINS
let elsewhere; // one that is not
let browser;

before(async () => {
  SDK_PAGE['/sdk.js'] = {
    type: 'text/javascript; charset=utf-8',
    body: await bundle('browser/openai-sdk-page.mjs'),
  };
  allowed = await serveFiles(SDK_PAGE);
  elsewhere = await serveFiles(SDK_PAGE);
  relay = await startRelay({ allowedOrigins: [allowed.origin] });
  browser = await chromium.launch(LAUNCH);
});

after(async () => {
  await browser?.close();
  await relay?.stop();
  await allowed?.close();
  await elsewhere?.close();
});

/** A new page at `url`, collecting its console messages and uncaught errors. */
async function open(url) {
  const page = await browser.newPage();
  page.messages = [];
  page.on('console', (message) => page.messages.push(message.text()));
  page.on('pageerror', (error) => page.messages.push(`uncaught: ${error.message}`));
  await page.goto(url);
  return page;
}

describe('the openai npm SDK in a browser page', () => {
  test('streams a chat and a Responses answer from an allowed origin', async () => {
    const token = await accessToken(relay.api, 'sdk-page@example.com');
    const page = await open(allowed.origin);
    await page.waitForFunction(() => window.relayPage);
    const ask = (method, text) =>
      page.evaluate(
        async ({ base, token, method, text }) => {
          const { relayClient } = window.relayPage;
          return window.relayPage[method](relayClient(base, token), 'mock-echo', text);
        },
        { base: relay.base, token, method, text },
      );
    assert.equal(await ask('streamChat', 'hello through chat completions'), 'hello through chat completions');
    assert.equal(await ask('streamResponse', 'hello through the responses api'), 'hello through the responses api');
    await page.close();
  });

  test('is blocked by CORS from an origin relay does not allow', async () => {
    const token = await accessToken(relay.api, 'elsewhere@example.com');
    const page = await open(elsewhere.origin);
    await page.waitForFunction(() => window.relayPage);
    const outcome = await page.evaluate(
      async ({ base, token }) => {
        const { relayClient, streamChat } = window.relayPage;
        try {
          return { answer: await streamChat(relayClient(base, token, { maxRetries: 0 }), 'mock-echo', 'hi') };
        } catch (error) {
          return { error: error.constructor.name, message: error.message };
        }
      },
      { base: relay.base, token },
    );
    assert.deepEqual(outcome, { error: 'APIConnectionError', message: 'Connection error.' });
    assert.ok(
      page.messages.some((m) => m.includes(`from origin '${elsewhere.origin}' has been blocked by CORS policy`)),
      page.messages.join('\n'),
    );
    await page.close();
  });
});

describe('the playground page', () => {
  /** The last answer once it has finished streaming: `{state, text}`. */
  async function lastAnswer(page, count) {
    const handle = await page.waitForFunction((count) => {
      const answers = document.querySelectorAll('#transcript li.assistant');
      const last = answers[count - 1];
      return answers.length === count && last.dataset.state !== 'streaming'
        && { state: last.dataset.state, text: last.textContent };
    }, count);
    return handle.jsonValue();
  }

  /** Fills the login form and presses `button` (`#register-button` or `#login-button`). */
  async function signIn(page, email, button) {
    await page.fill('#email', email);
    await page.fill('#password', PASSWORD);
    await page.click(button);
    await page.waitForSelector('#chat', { state: 'visible' });
  }

  async function ask(page, api, text) {
    await page.selectOption('#api', api);
    await page.fill('#prompt', text);
    await page.click('#send-button');
  }

  test('registers, logs in, and streams with Chat Completions and Responses', async () => {
    const page = await open(`${relay.base}/`);
    await signIn(page, 'playground@example.com', '#register-button');
    assert.ok((await page.locator('#model option').allTextContents()).includes('mock-echo'));
    await page.selectOption('#model', 'mock-echo');

    await ask(page, 'chat', 'streamed by chat completions');
    assert.deepEqual(await lastAnswer(page, 1), { state: 'done', text: 'streamed by chat completions' });
    await ask(page, 'responses', 'streamed by the responses api');
    assert.deepEqual(await lastAnswer(page, 2), { state: 'done', text: 'streamed by the responses api' });

    // The rate-limit headers of that last answer are on the page.
    const shown = async (id) => page.locator(`#${id}`).textContent();
    assert.equal(await shown('x-ratelimit-limit'), '1000');
    assert.match(await shown('x-ratelimit-remaining'), /^\d+$/);
    assert.ok(Number(await shown('x-ratelimit-remaining')) < 1000);
    assert.match(await shown('x-ratelimit-reset'), /^\d+$/);
    assert.equal(await shown('retry-after'), '–');

    // An expired access token: the page refreshes the pair and asks again, once.
    await page.route('**/api/v1/chat/completions', (route) => route.fulfill({
      status: 401,
      contentType: 'application/json',
      headers: { 'www-authenticate': 'Bearer' },
      body: JSON.stringify({ error: { message: 'token expired', type: 'invalid_request_error', code: 'token_expired', param: null } }),
    }), { times: 1 });
    const refreshed = page.waitForResponse('**/api/v1/auth/refresh');
    await ask(page, 'chat', 'asked again after a refresh');
    assert.equal((await refreshed).status(), 200);
    assert.deepEqual(await lastAnswer(page, 3), { state: 'done', text: 'asked again after a refresh' });

    // Log out, and back in with the same account.
    await page.click('#logout-button');
    await page.waitForSelector('#login', { state: 'visible' });
    await signIn(page, 'playground@example.com', '#login-button');
    await ask(page, 'responses', 'back again');
    assert.deepEqual(await lastAnswer(page, 1), { state: 'done', text: 'back again' });

    // Everything ran under the page's strict CSP without a violation or an uncaught error.
    const problems = page.messages.filter((m) => /Content Security Policy|uncaught/.test(m));
    assert.deepEqual(problems, []);
    await page.close();
  });

  test('shows a stream that fails midway as an error, for both APIs', async () => {
    const page = await open(`${relay.base}/`);
    await signIn(page, 'cut@example.com', '#register-button');
    // What relay sends when the upstream fails after the answer has started.
    const sse = (body) => (route) => route.fulfill({ status: 200, contentType: 'text/event-stream', body });
    await page.route('**/api/v1/chat/completions', sse(
      'data: {"choices":[{"index":0,"delta":{"content":"half an"}}]}\n\n'
      + 'data: {"error":{"message":"the upstream stream failed","type":"server_error","code":"upstream_stream_error","param":null}}\n\n',
    ));
    await page.route('**/api/v1/responses', sse(
      'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"half an"}\n\n'
      + 'event: error\ndata: {"type":"error","code":"upstream_stream_error","message":"the upstream stream failed","param":null}\n\n',
    ));
    await ask(page, 'chat', 'one');
    assert.deepEqual(await lastAnswer(page, 1), { state: 'error', text: 'half an [the upstream stream failed]' });
    await ask(page, 'responses', 'two');
    assert.deepEqual(await lastAnswer(page, 2), { state: 'error', text: 'half an [the upstream stream failed]' });
    await page.close();
  });
});
