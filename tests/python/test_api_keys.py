"""API keys (`rk-…`) with the official openai SDK: a server passes its key as `api_key`."""

import json
import sqlite3
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone

import openai
import pytest

from conftest import DATABASE, new_user_token, post_json


def request(url: str, token: str, method: str = "GET") -> tuple[int, dict]:
    req = urllib.request.Request(url, method=method, headers={"authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req) as resp:
            body = resp.read()
            return resp.status, json.loads(body) if body else {}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def make_key(relay_url: str, email: str, **extra) -> tuple[str, dict]:
    token = new_user_token(relay_url, email)
    made = post_json(f"{relay_url}/api/v1/auth/api-keys", {"name": "server", **extra}, token)
    return token, made


def sdk(relay_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{relay_url}/api/v1", api_key=key, max_retries=0)


def until(check, seconds: float = 5.0):
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.1)


def test_a_key_works_with_the_sdk_and_usage_shows_it(relay_url):
    _, made = make_key(relay_url, "key-sdk@example.com")
    key = made["key"]
    assert key.startswith("rk-")
    client = sdk(relay_url, key)

    completion = client.chat.completions.create(
        model="mock-echo", messages=[{"role": "user", "content": "hello from a key"}]
    )
    assert completion.choices[0].message.content == "hello from a key"
    stream = client.chat.completions.create(
        model="mock-echo",
        messages=[{"role": "user", "content": "streamed by key"}],
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "streamed by key"
    assert "mock-echo" in [m.id for m in client.models.list()]

    def keyed():
        status, report = request(f"{relay_url}/api/v1/usage?group_by=api_key", key)
        assert status == 200, report
        return report if report["total"]["requests"] == 2 else None

    report = until(keyed)
    assert report["groups"] == [
        {
            "key": made["id"],
            "requests": 2,
            "prompt_tokens": report["total"]["prompt_tokens"],
            "completion_tokens": report["total"]["completion_tokens"],
            "total_tokens": report["total"]["total_tokens"],
        }
    ]


def test_a_key_is_refused_on_account_endpoints(relay_url):
    _, made = make_key(relay_url, "key-account@example.com")
    status, body = request(f"{relay_url}/api/v1/auth/me", made["key"])
    assert status == 403
    assert body["error"]["code"] == "api_key_not_allowed"
    status, _ = request(f"{relay_url}/api/v1/admin/users", made["key"])
    assert status == 403


def test_a_deleted_key_raises_authentication_error(relay_url):
    token, made = make_key(relay_url, "key-deleted@example.com")
    client = sdk(relay_url, made["key"])
    client.chat.completions.create(model="mock-echo", messages=[{"role": "user", "content": "hi"}])
    status, _ = request(f"{relay_url}/api/v1/auth/api-keys/{made['id']}", token, "DELETE")
    assert status == 204
    with pytest.raises(openai.AuthenticationError) as err:
        client.chat.completions.create(
            model="mock-echo", messages=[{"role": "user", "content": "hi"}]
        )
    assert err.value.code == "invalid_api_key"


def test_an_expired_key_raises_authentication_error_within_5_s(relay_url):
    _, made = make_key(relay_url, "key-expired@example.com", expires_in_days=1)
    client = sdk(relay_url, made["key"])
    client.chat.completions.create(model="mock-echo", messages=[{"role": "user", "content": "hi"}])
    # A day passes, in the database.
    past = (datetime.now(timezone.utc) - timedelta(minutes=1)).isoformat()
    path = DATABASE["url"].removeprefix("sqlite://")
    with sqlite3.connect(path) as db:
        db.execute(
            "UPDATE api_keys SET expires_at = ? WHERE id = ?",
            (past, uuid.UUID(made["id"]).bytes),
        )

    def refused():
        try:
            # Models, not chat: the session relay's chat limit is small.
            client.models.list()
            return None
        except openai.AuthenticationError as err:
            return err

    err = until(refused)
    assert err.code == "api_key_expired"


def test_made_up_keys_raise_authentication_error_and_keys_are_never_logged(relay_url):
    _, made = make_key(relay_url, "key-logged@example.com")
    key = made["key"]
    forged = key[:-1] + ("A" if key[-1] != "A" else "B")
    for guess in (forged, "rk-" + "A" * 59, "rk-nope"):
        with pytest.raises(openai.AuthenticationError):
            sdk(relay_url, guess).models.list()
    sdk(relay_url, key).models.list()

    # The log is written by a background thread: wait for the key's creation line and the
    # lines of the five requests since (the creation's own, three guesses, one list).
    def written():
        log = DATABASE["log"].read_text()
        after = log.split(made["id"], 1)
        return len(after) == 2 and after[1].count('"target":"relay::request"') >= 5 and log

    log = until(written)
    assert "API key created" in log, "the log is being written"
    assert made["id"] in log, "keys are known in the log by their id"
    assert key[12:] not in log
    assert forged[12:] not in log
