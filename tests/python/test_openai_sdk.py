"""The official openai SDK, pointed at relay, works as if relay were OpenAI."""

import time

import openai
import pytest

from conftest import new_user_token, relay_user_set

MESSAGES = [
    {"role": "system", "content": "You are a test."},
    {"role": "user", "content": "the quick brown fox"},
]


def test_create_without_stream(client):
    completion = client.chat.completions.create(model="mock-echo", messages=MESSAGES)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "the quick brown fox"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == 4


def test_create_with_stream(client):
    stream = client.chat.completions.create(model="mock-echo", messages=MESSAGES, stream=True)
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "the quick brown fox"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks), "no usage chunk unless asked for"


def test_stream_with_usage(client):
    stream = client.chat.completions.create(
        model="mock-echo",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens == 8


def test_default_model_is_used_when_none_is_named(client):
    # The SDK requires `model`; send the raw request to leave it out.
    raw = client.post(
        "/chat/completions",
        body={"messages": MESSAGES},
        cast_to=object,
    )
    assert raw["model"] == "mock-echo"


def test_models_list(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["mock-echo", "mock-embed"]


def test_models_retrieve(client):
    model = client.models.retrieve("mock-echo")
    assert (model.id, model.object) == ("mock-echo", "model")
    # Allowed by relay but not offered by the upstream, and not allowed at all: both unknown.
    for missing in ["mock-error-500", "gpt-not-here"]:
        with pytest.raises(openai.NotFoundError) as err:
            client.models.retrieve(missing)
        assert err.value.code == "model_not_found"


def test_embeddings_create(client):
    # The SDK asks for base64 by default and decodes it; floats when asked for.
    result = client.embeddings.create(model="mock-embed", input=["the quick brown fox", "jumps"])
    assert [d.index for d in result.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in result.data)
    assert result.usage.prompt_tokens == 5
    floats = client.embeddings.create(
        model="mock-embed", input="the quick brown fox", encoding_format="float"
    )
    assert floats.data[0].embedding == pytest.approx(result.data[0].embedding, abs=1e-6)
    with pytest.raises(openai.PermissionDeniedError):
        client.embeddings.create(model="text-embedding-3-small", input="x")


def test_bad_token_raises_authentication_error(relay_url):
    bad = openai.OpenAI(base_url=f"{relay_url}/api/v1", api_key="not-a-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model="mock-echo", messages=MESSAGES)
    assert err.value.status_code == 401
    assert err.value.body["type"] == "authentication_error"


def test_upstream_429_raises_rate_limit_error(client):
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="mock-error-429", messages=MESSAGES)
    assert err.value.response.headers["retry-after"] == "7"


def test_invalid_request_raises_unprocessable_entity(client):
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model="mock-echo", messages=MESSAGES, temperature=5)
    assert err.value.body["param"] == "temperature"


def test_other_statuses_raise_api_status_error(client):
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="mock-error-500", messages=MESSAGES)
    assert err.value.status_code == 500
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(model="not-allowed", messages=MESSAGES)
    assert isinstance(err.value, openai.APIStatusError)
    assert err.value.body["code"] == "model_not_allowed"


def test_spent_capacity_raises_rate_limit_error(relay_url):
    token = new_user_token(relay_url, "spender@example.com")
    client = openai.OpenAI(base_url=f"{relay_url}/api/v1", api_key=token, max_retries=0)
    for _ in range(25):  # RATE_LIMIT_CHAT_REQUESTS in conftest
        client.chat.completions.create(model="mock-echo", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="mock-echo", messages=MESSAGES)
    assert err.value.body["type"] == "rate_limit_error"
    assert int(err.value.response.headers["retry-after"]) >= 1
    assert err.value.response.headers["x-ratelimit-remaining"] == "0"


@pytest.fixture(scope="module")
def responses_client(relay_url):
    token = new_user_token(relay_url, "responses@example.com")
    return openai.OpenAI(base_url=f"{relay_url}/api/v1", api_key=token, max_retries=0)


def test_responses_create(responses_client):
    response = responses_client.responses.create(model="mock-echo", input="the quick brown fox")
    assert response.object == "response"
    assert response.status == "completed"
    assert response.output_text == "the quick brown fox"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (4, 4)


def test_responses_stream(responses_client):
    stream = responses_client.responses.create(
        model="mock-echo", input=[{"role": "user", "content": "jumps over the dog"}], stream=True
    )
    events = list(stream)
    assert events[0].type == "response.created"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "jumps over the dog"
    assert events[-1].type == "response.completed"
    assert events[-1].response.usage.output_tokens == 4
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_responses_previous_response_id_is_the_owners_only(relay_url, responses_client):
    first = responses_client.responses.create(model="mock-echo", input="remember the fox")
    second = responses_client.responses.create(
        model="mock-echo", input="what did I say?", previous_response_id=first.id
    )
    assert second.previous_response_id == first.id
    assert responses_client.responses.retrieve(first.id).output_text == "remember the fox"
    items = responses_client.responses.input_items.list(first.id)
    assert items.data[0].content[0].text == "remember the fox"

    other = openai.OpenAI(
        base_url=f"{relay_url}/api/v1",
        api_key=new_user_token(relay_url, "other@example.com"),
        max_retries=0,
    )
    with pytest.raises(openai.NotFoundError) as err:
        other.responses.create(model="mock-echo", input="tell me", previous_response_id=first.id)
    assert err.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(first.id)
    # Still there for its owner, who can delete it.
    responses_client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        responses_client.responses.retrieve(first.id)


def test_responses_conversation_is_refused_clearly(responses_client):
    with pytest.raises(openai.UnprocessableEntityError) as err:
        responses_client.responses.create(model="mock-echo", input="x", conversation="conv_1")
    assert err.value.body["param"] == "conversation"


def test_a_token_limit_raises_rate_limit_error_with_its_code(relay_url):
    token = new_user_token(relay_url, "token-limited@example.com")
    client = openai.OpenAI(base_url=f"{relay_url}/api/v1", api_key=token, max_retries=0)
    client.chat.completions.create(model="mock-echo", messages=MESSAGES, max_tokens=10)
    relay_user_set("--email", "token-limited@example.com", "--token-limit", "60")
    deadline = time.monotonic() + 6
    while True:  # relay sees the new limit within seconds
        try:
            client.chat.completions.create(model="mock-echo", messages=MESSAGES, max_tokens=10)
        except openai.RateLimitError as err:
            assert err.code == "token_limit_exceeded"
            assert int(err.response.headers["retry-after"]) >= 1
            assert err.response.headers["x-ratelimit-limit-tokens"] == "60"
            break
        assert time.monotonic() < deadline, "the token limit never applied"
        time.sleep(0.5)  # the chat request limit (25) is not to be spent here
