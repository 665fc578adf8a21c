// relay's playground: log in, pick a model, stream a chat. It is also the example of how a
// frontend talks to relay: plain `fetch`, a `ReadableStream` reader and a small SSE parser,
// no framework and no build step.

// relay serves this page, so the API is on the same origin. From your own app's origin, use
// relay's full URL here and list your origin in relay's ALLOWED_ORIGINS.
const API = '/api/v1';

// The token pair lives in this module's memory only. Not in localStorage: every script on the
// origin can read it there, and it outlives the tab. Not in a cookie: relay reads the token
// from `Authorization: Bearer`, and a header cannot be sent by another site (no CSRF). The
// price: a reload logs you out (sessionStorage would keep the pair for this tab's life, for
// the same exposure to a script injected into the page).
let tokens = null; // {access_token, refresh_token, token_type, expires_in}

/** An error answer of relay: `{"error": {"message", "type", "code", "param"}}`. */
class ApiError extends Error {
  constructor(status, error) {
    super(error.message);
    this.status = status;
    this.code = error.code;
  }
}

/** The error envelope of a failed response (every relay error has one). */
async function errorOf(response) {
  const body = await response.json().catch(() => null);
  return new ApiError(response.status, body?.error ?? { message: `HTTP ${response.status}` });
}

/** `POST` a JSON body to relay, without credentials. */
function postJson(path, body) {
  return fetch(API + path, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
}

// --- Accounts -------------------------------------------------------------------------------

async function login(email, password) {
  const response = await postJson('/auth/login', { email, password });
  if (!response.ok) throw await errorOf(response);
  tokens = await response.json();
}

async function register(email, password) {
  const response = await postJson('/auth/register', { email, password });
  if (!response.ok) throw await errorOf(response);
  await login(email, password);
}

// A refresh token works once: relay rotates the pair, and a spent refresh token presented
// again revokes the whole session. So calls that see `token_expired` at the same time share
// one refresh instead of racing.
let refreshing = null;

function refreshTokens() {
  refreshing ??= (async () => {
    try {
      const response = await postJson('/auth/refresh', { refresh_token: tokens?.refresh_token });
      if (!response.ok) throw await errorOf(response);
      tokens = await response.json();
    } finally {
      refreshing = null;
    }
  })();
  return refreshing;
}

/**
 * An authenticated call to relay. An access token lives 30 minutes by default: on a 401 whose
 * code is `token_expired`, it refreshes the pair and retries once. Any other 401 (or a failed
 * refresh) ends the session: back to the login form.
 */
async function api(path, init = {}) {
  const send = () => fetch(API + path, {
    ...init,
    headers: { ...init.headers, Authorization: `Bearer ${tokens?.access_token}` },
  });
  let response = await send();
  if (response.status === 401 && (await errorOf(response.clone())).code === 'token_expired') {
    try {
      await refreshTokens();
    } catch (error) {
      endSession('Your session has ended: log in again.');
      throw error;
    }
    response = await send();
  }
  showRateLimits(response.headers);
  if (!response.ok) {
    const error = await errorOf(response);
    if (response.status === 401) endSession('Your session has ended: log in again.');
    throw error;
  }
  return response;
}

// --- Streaming ------------------------------------------------------------------------------

/**
 * The server-sent events of a `fetch` response, as `{event, data}`. (`EventSource` cannot be
 * used: it only sends GET, without an `Authorization` header.) Leaving the loop early cancels
 * the response, and relay then cancels the upstream request.
 */
async function* readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      // An event ends at a blank line; a chunk may hold several events, or part of one.
      while ((end = buffer.indexOf('\n\n')) !== -1) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = 'message';
        const data = [];
        for (const line of block.split('\n')) {
          if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
          else if (line.startsWith('event:')) event = line.slice(6).trim();
          // `id:`, `retry:` and `:` comments: relay does not send them.
        }
        if (data.length > 0) yield { event, data: data.join('\n') };
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

const JSON_HEADERS = { 'Content-Type': 'application/json' };

/**
 * Chat Completions, streamed: `data: {chunk}` events whose text is in
 * `choices[0].delta.content`, then `data: [DONE]`. A failure after the answer has started
 * arrives as a last `data: {"error": {...}}`.
 */
async function* chatCompletionText(model, messages) {
  const response = await api('/chat/completions', {
    method: 'POST',
    headers: JSON_HEADERS,
    body: JSON.stringify({ model, messages, stream: true }),
  });
  for await (const { data } of readEvents(response)) {
    if (data === '[DONE]') return;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new Error(chunk.error.message);
    const text = chunk.choices?.[0]?.delta?.content;
    if (text) yield text;
  }
  throw new Error('the answer was cut off');
}

/**
 * The Responses API, streamed: typed events (`event: response.output_text.delta` with
 * `data: {"type": "response.output_text.delta", "delta": "..."}`, …) ending with
 * `response.completed`; a failure ends with an `error` (or `response.failed`) event.
 */
async function* responsesText(model, messages) {
  const response = await api('/responses', {
    method: 'POST',
    headers: JSON_HEADERS,
    body: JSON.stringify({ model, input: messages, stream: true }),
  });
  for await (const { event, data } of readEvents(response)) {
    const payload = JSON.parse(data);
    switch (payload.type ?? event) {
      case 'response.output_text.delta':
        yield payload.delta;
        break;
      case 'response.completed':
        return;
      case 'response.failed':
        throw new Error(payload.response?.error?.message ?? 'the response failed');
      case 'error':
        throw new Error(payload.error?.message ?? payload.message ?? 'the stream failed');
      // Other events (response.created, output_item.added, …) carry nothing to show here.
    }
  }
  throw new Error('the answer was cut off');
}

// --- The page -------------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

// The conversation so far, as `{role, content}` messages: both APIs take this list (as
// `messages` or as `input`), so the selector can change between turns.
const conversation = [];

function setStatus(message, isError = false) {
  $('status').textContent = message;
  $('status').classList.toggle('error', isError);
}

// relay's rate-limit headers: the bucket's size, the requests left in it, the seconds until it
// is full again, and on a 429 the seconds to wait. (A page on another origin can read them
// because relay lists them in `Access-Control-Expose-Headers`.)
const RATE_LIMIT_HEADERS = ['X-RateLimit-Limit', 'X-RateLimit-Remaining', 'X-RateLimit-Reset', 'Retry-After'];

function showRateLimits(headers) {
  for (const name of RATE_LIMIT_HEADERS) $(name.toLowerCase()).textContent = headers.get(name) ?? '–';
}

function addTurn(role, text) {
  const item = document.createElement('li');
  item.className = role;
  item.textContent = text; // text, never HTML: a model's answer is untrusted input
  $('transcript').append(item);
  return item;
}

async function startSession(email) {
  const { data } = await (await api('/models')).json();
  $('model').replaceChildren(...data.map((model) => new Option(model.id, model.id)));
  $('who').textContent = email;
  $('password').value = '';
  $('login').hidden = true;
  $('chat').hidden = false;
  setStatus('');
  $('prompt').focus();
}

function endSession(message) {
  tokens = null;
  conversation.length = 0;
  $('transcript').replaceChildren();
  $('chat').hidden = true;
  $('login').hidden = false;
  setStatus(message, true);
}

async function signIn(how) {
  setStatus('');
  const email = $('email').value;
  try {
    await how(email, $('password').value);
    await startSession(email);
  } catch (error) {
    tokens = null;
    setStatus(error.message, true);
  }
}

$('login-form').addEventListener('submit', (event) => {
  event.preventDefault();
  signIn(login);
});

$('register-button').addEventListener('click', () => {
  if ($('login-form').reportValidity()) signIn(register);
});

$('logout-button').addEventListener('click', async () => {
  // Logging out spends the refresh token on the server; the access token just runs out.
  const body = JSON.stringify({ refresh_token: tokens?.refresh_token });
  await api('/auth/logout', { method: 'POST', headers: JSON_HEADERS, body }).catch(() => {});
  endSession('Logged out.');
});

$('prompt').addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey) {
    event.preventDefault();
    $('chat-form').requestSubmit();
  }
});

$('chat-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const text = $('prompt').value.trim();
  if (!text || $('send-button').disabled) return;
  $('prompt').value = '';
  conversation.push({ role: 'user', content: text });
  addTurn('user', text);
  const answer = addTurn('assistant', '');
  answer.dataset.state = 'streaming';
  const stream = $('api').value === 'responses' ? responsesText : chatCompletionText;
  $('send-button').disabled = true;
  try {
    for await (const piece of stream($('model').value, conversation)) answer.textContent += piece;
    conversation.push({ role: 'assistant', content: answer.textContent });
    answer.dataset.state = 'done';
  } catch (error) {
    conversation.pop(); // the unanswered question is not sent again with the next one
    answer.classList.add('error');
    answer.textContent = [answer.textContent, `[${error.message}]`].filter(Boolean).join(' ');
    answer.dataset.state = 'error';
  } finally {
    $('send-button').disabled = false;
  }
});
