// A browser app using the official `openai` npm SDK against relay: the browser test bundles
// this file into a page (esbuild, platform "browser") and calls it through `window.relayPage`.

import OpenAI from 'openai';

/** A client for relay at `relayUrl`, signed in with the user's access token. */
export function relayClient(relayUrl, accessToken, options = {}) {
  return new OpenAI({
    baseURL: `${relayUrl}/api/v1`,
    // relay's access token of the signed-in user, not an OpenAI key: it is the user's own,
    // short-lived, and limited by relay, so it may be in the page.
    apiKey: accessToken,
    dangerouslyAllowBrowser: true,
    ...options,
  });
}

/** Streams a Chat Completions answer to `text`; returns the whole answer. */
export async function streamChat(client, model, text) {
  const stream = await client.chat.completions.create({
    model,
    messages: [{ role: 'user', content: text }],
    stream: true,
  });
  let answer = '';
  for await (const chunk of stream) answer += chunk.choices[0]?.delta?.content ?? '';
  return answer;
}

/** Streams a Responses API answer to `text`; returns the whole answer. */
export async function streamResponse(client, model, text) {
  const stream = await client.responses.create({ model, input: text, stream: true });
  let answer = '';
  for await (const event of stream) {
    if (event.type === 'response.output_text.delta') answer += event.delta;
  }
  return answer;
}

window.relayPage = { relayClient, streamChat, streamResponse };
