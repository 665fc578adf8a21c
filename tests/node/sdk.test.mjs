// The official `openai` npm SDK and the Vercel AI SDK, pointed at relay, work as if relay were
// OpenAI. relay runs in front of its own mock upstream, whose `mock-echo` answers with the last
// user text (word by word when streaming) and counts tokens as whitespace-separated words.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import OpenAI from 'openai';
import { createOpenAI } from '@ai-sdk/openai';
import { generateText, streamText } from 'ai';

import { startRelay } from './harness.mjs';

const ECHO = 'the quick brown fox';
const MESSAGES = [
  { role: 'system', content: 'You are a test.' },
  { role: 'user', content: ECHO },
];
// RATE_LIMIT_CHAT_REQUESTS below: every user's bucket for chat, responses and embeddings.
const CHAT_CAPACITY = 30;

let relay;

before(async () => {
  relay = await startRelay({ RATE_LIMIT_CHAT_REQUESTS: String(CHAT_CAPACITY) });
});

after(async () => {
  await relay?.stop();
});

async function collect(stream) {
  const items = [];
  for await (const item of stream) items.push(item);
  return items;
}

describe('openai npm SDK', () => {
  let client;
  let accessToken;

  before(async () => {
    accessToken = await relay.newUser('openai-sdk@example.com');
    client = new OpenAI({ baseURL: relay.url + '/api/v1', apiKey: accessToken });
  });

  test('chat.completions.create echoes, with usage', async () => {
    const completion = await client.chat.completions.create({ model: 'mock-echo', messages: MESSAGES });
    assert.equal(completion.object, 'chat.completion');
    assert.equal(completion.model, 'mock-echo');
    assert.equal(completion.choices[0].message.content, ECHO);
    assert.equal(completion.choices[0].finish_reason, 'stop');
    assert.deepEqual(completion.usage, { prompt_tokens: 8, completion_tokens: 4, total_tokens: 12 });
  });

  test('chat.completions.create stream: deltas make the echo, no usage unless asked for', async () => {
    const chunks = await collect(
      await client.chat.completions.create({ model: 'mock-echo', messages: MESSAGES, stream: true }),
    );
    assert.ok(chunks.length >= 4, `one chunk per word at least, got ${chunks.length}`);
    assert.ok(chunks.every((c) => c.object === 'chat.completion.chunk'));
    const text = chunks.map((c) => c.choices[0]?.delta?.content ?? '').join('');
    assert.equal(text, ECHO);
    assert.equal(chunks.at(-1).choices[0].finish_reason, 'stop');
    assert.ok(
      chunks.every((c) => c.usage == null),
      'relay asks the upstream for usage, but passes it on only when the client asked',
    );
  });

  test('chat.completions.create stream with include_usage: the usage chunk arrives last', async () => {
    const chunks = await collect(
      await client.chat.completions.create({
        model: 'mock-echo',
        messages: MESSAGES,
        stream: true,
        stream_options: { include_usage: true },
      }),
    );
    const text = chunks.map((c) => c.choices[0]?.delta?.content ?? '').join('');
    assert.equal(text, ECHO);
    const last = chunks.at(-1);
    assert.deepEqual(last.choices, []);
    assert.deepEqual(last.usage, { prompt_tokens: 8, completion_tokens: 4, total_tokens: 12 });
    assert.equal(chunks.filter((c) => c.usage != null).length, 1, 'exactly one usage chunk');
  });

  test('responses.create echoes, with usage', async () => {
    const response = await client.responses.create({ model: 'mock-echo', input: ECHO });
    assert.equal(response.object, 'response');
    assert.equal(response.status, 'completed');
    assert.match(response.id, /^resp_/);
    assert.equal(response.output_text, ECHO);
    assert.equal(response.usage.input_tokens, 4);
    assert.equal(response.usage.output_tokens, 4);
    assert.equal(response.usage.total_tokens, 8);
  });

  test('responses.create stream: typed events, text deltas make the echo, completed with usage', async () => {
    const events = await collect(
      await client.responses.create({ model: 'mock-echo', input: ECHO, stream: true }),
    );
    const types = events.map((e) => e.type);
    assert.equal(types[0], 'response.created');
    assert.equal(types.at(-1), 'response.completed');
    const deltas = events.filter((e) => e.type === 'response.output_text.delta');
    assert.ok(deltas.length >= 4, `one delta per word at least, got ${deltas.length}`);
    assert.equal(deltas.map((e) => e.delta).join(''), ECHO);
    const seq = events.map((e) => e.sequence_number);
    assert.deepEqual(seq, [...seq].sort((a, b) => a - b), 'events arrive in order');
    const completed = events.at(-1).response;
    assert.equal(completed.status, 'completed');
    assert.equal(completed.usage.input_tokens, 4);
    assert.equal(completed.usage.output_tokens, 4);
  });

  test("previous_response_id: one's own works, another user's is NotFoundError", async () => {
    const first = await client.responses.create({ model: 'mock-echo', input: 'first turn' });
    const second = await client.responses.create({
      model: 'mock-echo',
      input: 'second turn',
      previous_response_id: first.id,
    });
    assert.equal(second.output_text, 'second turn');
    assert.equal(second.previous_response_id, first.id);

    const otherToken = await relay.newUser('other-user@example.com');
    const other = new OpenAI({ baseURL: relay.url + '/api/v1', apiKey: otherToken, maxRetries: 0 });
    const err = await other.responses
      .create({ model: 'mock-echo', input: 'steal it', previous_response_id: first.id })
      .then(
        () => assert.fail('another user continued my conversation'),
        (e) => e,
      );
    assert.ok(err instanceof OpenAI.NotFoundError, `expected NotFoundError, got ${err}`);
    assert.equal(err.status, 404);
    assert.equal(err.param, 'previous_response_id');

    // The same for reading the stored response: the owner can, anyone else is told it is not there.
    const stored = await client.responses.retrieve(first.id);
    assert.equal(stored.id, first.id);
    assert.equal(stored.output_text, 'first turn');
    await assert.rejects(other.responses.retrieve(first.id), OpenAI.NotFoundError);
  });

  test('models.list and models.retrieve', async () => {
    const ids = [];
    for await (const model of client.models.list()) ids.push(model.id);
    assert.deepEqual(ids, ['mock-echo', 'mock-embed']);

    const model = await client.models.retrieve('mock-echo');
    assert.equal(model.id, 'mock-echo');
    assert.equal(model.object, 'model');
    // Allowed by relay but not offered by the upstream, and not allowed at all: both unknown.
    for (const missing of ['mock-error-500', 'gpt-not-here']) {
      await assert.rejects(client.models.retrieve(missing), (err) => {
        assert.ok(err instanceof OpenAI.NotFoundError, `${missing}: expected NotFoundError, got ${err}`);
        assert.equal(err.code, 'model_not_found');
        return true;
      });
    }
  });

  test('embeddings.create (base64 by default, decoded by the SDK; floats when asked for)', async () => {
    const result = await client.embeddings.create({ model: 'mock-embed', input: [ECHO, 'jumps'] });
    assert.deepEqual(
      result.data.map((d) => d.index),
      [0, 1],
    );
    assert.ok(result.data.every((d) => Array.isArray(d.embedding) && d.embedding.length === 8));
    assert.ok(result.data[0].embedding.some((x) => x !== 0), 'a real vector, not zeros');
    assert.equal(result.usage.prompt_tokens, 5);
    const floats = await client.embeddings.create({
      model: 'mock-embed',
      input: ECHO,
      encoding_format: 'float',
    });
    floats.data[0].embedding.forEach((x, i) => {
      assert.ok(Math.abs(x - result.data[0].embedding[i]) < 1e-6, `component ${i}`);
    });
  });

  test('a bad token is AuthenticationError', async () => {
    const bad = new OpenAI({ baseURL: relay.url + '/api/v1', apiKey: 'not-a-token', maxRetries: 0 });
    await assert.rejects(bad.chat.completions.create({ model: 'mock-echo', messages: MESSAGES }), (err) => {
      assert.ok(err instanceof OpenAI.AuthenticationError, `expected AuthenticationError, got ${err}`);
      assert.equal(err.status, 401);
      assert.equal(err.type, 'authentication_error');
      return true;
    });
    await assert.rejects(bad.responses.create({ model: 'mock-echo', input: ECHO }), OpenAI.AuthenticationError);
  });

  test("the upstream's 429 is RateLimitError with its Retry-After", async () => {
    const noRetry = new OpenAI({ baseURL: relay.url + '/api/v1', apiKey: accessToken, maxRetries: 0 });
    await assert.rejects(noRetry.chat.completions.create({ model: 'mock-error-429', messages: MESSAGES }), (err) => {
      assert.ok(err instanceof OpenAI.RateLimitError, `expected RateLimitError, got ${err}`);
      assert.equal(err.headers.get('retry-after'), '7');
      return true;
    });
  });

  test("relay's own limit: a spent bucket is RateLimitError with Retry-After", async () => {
    const token = await relay.newUser('spender@example.com');
    const spender = new OpenAI({ baseURL: relay.url + '/api/v1', apiKey: token, maxRetries: 0 });
    for (let i = 0; i < CHAT_CAPACITY; i++) {
      await spender.chat.completions.create({ model: 'mock-echo', messages: MESSAGES });
    }
    await assert.rejects(spender.responses.create({ model: 'mock-echo', input: ECHO }), (err) => {
      assert.ok(err instanceof OpenAI.RateLimitError, `expected RateLimitError, got ${err}`);
      assert.equal(err.type, 'rate_limit_error');
      assert.equal(err.code, 'rate_limit_exceeded');
      assert.ok(Number(err.headers.get('retry-after')) >= 1);
      assert.equal(err.headers.get('x-ratelimit-remaining'), '0');
      return true;
    });
  });
});

describe('Vercel AI SDK', () => {
  let provider;

  before(async () => {
    const accessToken = await relay.newUser('ai-sdk@example.com');
    provider = createOpenAI({ baseURL: relay.url + '/api/v1', apiKey: accessToken });
  });

  // The default provider model speaks the Responses API.
  test('generateText with the default model (Responses API)', async () => {
    const result = await generateText({ model: provider('mock-echo'), prompt: ECHO });
    assert.equal(result.text, ECHO);
    assert.equal(result.finishReason, 'stop');
    assert.match(result.response.id, /^resp_/, 'answered by POST /responses');
    assert.equal(result.usage.inputTokens, 4);
    assert.equal(result.usage.outputTokens, 4);
    assert.equal(result.usage.totalTokens, 8);
  });

  test('streamText with the default model (Responses API)', async () => {
    const result = streamText({ model: provider('mock-echo'), prompt: ECHO });
    const parts = await collect(result.textStream);
    assert.ok(parts.length >= 4, `streamed word by word, got ${JSON.stringify(parts)}`);
    assert.equal(parts.join(''), ECHO);
    assert.equal(await result.finishReason, 'stop');
    assert.match((await result.response).id, /^resp_/, 'answered by POST /responses');
    const usage = await result.usage;
    assert.equal(usage.inputTokens, 4);
    assert.equal(usage.outputTokens, 4);
  });

  // The next turn of a conversation: the AI SDK sends the earlier answers back as
  // `item_reference`s to the stored items, which relay serves to their owner only.
  test('a second turn refers to the first answer by item id; another user cannot', async () => {
    const first = await streamText({ model: provider('mock-echo'), prompt: 'first turn' });
    assert.equal(await first.text, 'first turn');
    const history = [{ role: 'user', content: 'first turn' }, ...(await first.response).messages];
    const itemId = history[1].content[0].providerOptions?.openai?.itemId;
    assert.match(itemId ?? '', /^msg_/, 'the answer carries its stored item id');

    let sent;
    const second = await generateText({
      model: provider('mock-echo'),
      messages: [...history, { role: 'user', content: 'second turn' }],
    });
    assert.equal(second.text, 'second turn');

    const otherToken = await relay.newUser('ai-sdk-other@example.com');
    const other = createOpenAI({
      baseURL: relay.url + '/api/v1',
      apiKey: otherToken,
      fetch: async (url, init) => {
        sent = JSON.parse(init.body);
        return fetch(url, init);
      },
    });
    await assert.rejects(
      generateText({ model: other('mock-echo'), messages: [...history, { role: 'user', content: 'tell me' }], maxRetries: 0 }),
      (err) => err.statusCode === 404 && /input\[1\]\.id/.test(err.responseBody ?? ''),
    );
    assert.deepEqual(sent.input[1], { type: 'item_reference', id: itemId });
  });

  test('generateText with provider.chat (Chat Completions)', async () => {
    const result = await generateText({ model: provider.chat('mock-echo'), system: 'You are a test.', prompt: ECHO });
    assert.equal(result.text, ECHO);
    assert.equal(result.finishReason, 'stop');
    assert.match(result.response.id, /^chatcmpl-/, 'answered by POST /chat/completions');
    assert.equal(result.usage.inputTokens, 8);
    assert.equal(result.usage.outputTokens, 4);
    assert.equal(result.usage.totalTokens, 12);
  });

  test('streamText with provider.chat (Chat Completions)', async () => {
    const result = streamText({ model: provider.chat('mock-echo'), system: 'You are a test.', prompt: ECHO });
    const parts = await collect(result.textStream);
    assert.ok(parts.length >= 4, `streamed word by word, got ${JSON.stringify(parts)}`);
    assert.equal(parts.join(''), ECHO);
    assert.equal(await result.finishReason, 'stop');
    assert.match((await result.response).id, /^chatcmpl-/, 'answered by POST /chat/completions');
    // The AI SDK asks for the usage chunk (stream_options.include_usage); relay passes it on.
    const usage = await result.usage;
    assert.equal(usage.inputTokens, 8);
    assert.equal(usage.outputTokens, 4);
  });
});
