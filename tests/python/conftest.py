"""Fixtures: a real relay binary in front of the real built-in mock upstream, on free ports."""

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RELAY = Path(os.environ.get("RELAY_BIN", ROOT / "target" / "debug" / "relay"))
SECRET = "python-sdk-tests-secret-key-0123456789abcdef"
# Where the session's relay keeps its database (for `relay user set` in tests) and its log.
DATABASE = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except Exception:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


def post_json(url: str, body: dict, token: str | None = None) -> dict:
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req) as resp:
        return json.load(resp)


@pytest.fixture(scope="session")
def relay_url():
    assert RELAY.exists(), f"build relay first: {RELAY} is missing"
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        mock_port, relay_port = free_port(), free_port()
        mock = subprocess.Popen(
            [str(RELAY), "mock-upstream", "--port", str(mock_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(mock)
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PORT": str(relay_port),
            "SECRET_KEY": SECRET,
            "OPENAI_API_KEY": "sk-python-tests",
            "OPENAI_BASE_URL": f"http://127.0.0.1:{mock_port}/v1",
            "DEFAULT_MODEL": "mock-echo",
            "ALLOWED_MODELS": "mock-echo,mock-embed,mock-error-429,mock-error-500",
            "DATABASE_URL": DATABASE.setdefault("url", f"sqlite://{tmp}/relay.db"),
            "REDIS_URL": "",
            "RATE_LIMIT_REQUESTS": "100000",
            "RATE_LIMIT_CHAT_REQUESTS": "25",
            "LOG_LEVEL": "info",
        }
        DATABASE["log"] = Path(tmp) / "relay.log"
        log = open(DATABASE["log"], "wb")
        relay = subprocess.Popen([str(RELAY), "serve"], env=env, cwd=tmp, stderr=log)
        procs.append(relay)
        try:
            base = f"http://127.0.0.1:{relay_port}"
            wait_for(f"{base}/api/v1/health", relay)
            yield base
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=10)
            log.close()


@pytest.fixture(scope="session")
def access_token(relay_url):
    api = f"{relay_url}/api/v1"
    post_json(f"{api}/auth/register", {"email": "sdk@example.com", "password": "password-123"})
    return post_json(f"{api}/auth/login", {"email": "sdk@example.com", "password": "password-123"})[
        "access_token"
    ]


def new_user_token(relay_url: str, email: str) -> str:
    api = f"{relay_url}/api/v1"
    post_json(f"{api}/auth/register", {"email": email, "password": "password-123"})
    return post_json(f"{api}/auth/login", {"email": email, "password": "password-123"})[
        "access_token"
    ]


@pytest.fixture
def client(relay_url, access_token):
    import openai

    return openai.OpenAI(base_url=f"{relay_url}/api/v1", api_key=access_token, max_retries=0)


def relay_user_set(*args: str) -> None:
    """Runs `relay user set` on the session relay's database."""
    subprocess.run(
        [str(RELAY), "user", "set", *args],
        env={"PATH": os.environ.get("PATH", ""), "DATABASE_URL": DATABASE["url"]},
        check=True,
        capture_output=True,
    )
