"""Agents cannot carry the process's secrets to an upstream the operator did not allow.

A real `serve` process, two fake OpenAI-compatible servers over real HTTP: `model` (the
operator's OPENAI_BASE_URL) and `attacker` (anything else). What an admin may put in an
agent's settings is refused with 422 and nothing reaches the attacker; an agent stored
under a looser configuration is stopped before its call once the configuration tightens.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from chatservice.auth import TokenCodec
from tests.conftest import TEST_SECRET, ServerProcess, new_user, start_server
from tests.e2e.agent_helpers import API, People, device, raw_reader, read_answer
from tests.e2e.conftest import frames_until_pong
from tests.fakes.openai_server import FakeOpenAI, running_fake

JSON = dict[str, Any]
ENV_KEY = "sk-operator-" + new_user("k")
MODEL_KEY = "sk-allowed-variable-" + new_user("k")


@pytest.fixture(scope="module")
def model() -> Iterator[FakeOpenAI]:
    with running_fake() as fake:
        yield fake


@pytest.fixture(scope="module")
def attacker() -> Iterator[FakeOpenAI]:
    with running_fake() as fake:
        yield fake


def policy_env(model: FakeOpenAI, **extra: Any) -> dict[str, Any]:
    return {
        "OPENAI_BASE_URL": model.base_url,
        "OPENAI_API_KEY": ENV_KEY,
        "AGENT_API_KEY_ENV_ALLOWED": "MODEL_KEY",
        "MODEL_KEY": MODEL_KEY,
        "AGENT_STALL_TIMEOUT": 2,
        **extra,
    }


@pytest.fixture(scope="module")
def strict_server(
    model: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("policy"), **policy_env(model))
    yield server
    server.stop()


@pytest.fixture
async def people(strict_server: ServerProcess) -> AsyncIterator[People]:
    made = People(strict_server, TokenCodec(TEST_SECRET))
    yield made
    await made.aclose()


async def create_agent(people: People, settings: JSON) -> Any:
    admin = people("admin", roles=["admin"])
    return await admin.http.post(
        f"{API}/agents", json={"name": "Agent", "backend": "openai", "settings": settings}
    )


async def ask(server: ServerProcess, people: People, agent_id: int, question: str) -> Any:
    alice = people("alice")
    session = await alice.client.create_session(agent_id=agent_id, title="q")
    ws = await device(server, session["session_id"], alice.token)
    try:
        await frames_until_pong(ws)
        await alice.client.send_message(session["session_id"], question)
        return await read_answer(raw_reader(ws))
    finally:
        await ws.close()


@pytest.mark.parametrize(
    ("settings", "rule"),
    [
        ({"api_key_env": "JWT_SECRET_KEY"}, "AGENT_API_KEY_ENV_ALLOWED"),
        ({"api_key_env": "PATH"}, "AGENT_API_KEY_ENV_ALLOWED"),
        ({"api_key_env": ["MODEL_KEY"]}, "AGENT_API_KEY_ENV_ALLOWED"),
        ({"base_url": "ATTACKER"}, "AGENT_ALLOWED_BASE_URLS"),
        ({"base_url": "http://169.254.169.254/latest/v1"}, "AGENT_ALLOWED_BASE_URLS"),
        ({"base_url": "http://[fd00:ec2::254]/v1"}, "AGENT_ALLOWED_BASE_URLS"),
        ({"base_url": "file:///etc/passwd"}, "http"),
        ({"base_url": "MODEL_WITH_USER"}, "credentials"),
        ({"base_url": 42}, "string"),
    ],
)
async def test_settings_outside_the_policy_are_refused(
    people: People,
    model: FakeOpenAI,
    attacker: FakeOpenAI,
    settings: JSON,
    rule: str,
) -> None:
    if settings.get("base_url") == "ATTACKER":
        settings = {"base_url": attacker.base_url, "api_key_env": "MODEL_KEY"}
    if settings.get("base_url") == "MODEL_WITH_USER":
        settings = {"base_url": model.base_url.replace("http://", "http://u:p@")}
    before = len(attacker.requests)
    response = await create_agent(people, settings)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "VALIDATION_ERROR"
    assert rule in response.json()["error"]["message"]
    for secret in (TEST_SECRET, ENV_KEY, MODEL_KEY):
        assert secret not in response.text
    assert len(attacker.requests) == before


async def test_an_allowed_key_variable_reaches_the_allowed_upstream_only(
    strict_server: ServerProcess, people: People, model: FakeOpenAI
) -> None:
    response = await create_agent(people, {"api_key_env": "MODEL_KEY", "model": "m"})
    assert response.status_code == 201, response.text
    assert MODEL_KEY not in response.text
    listed = await people("reader").http.get(f"{API}/agents")
    assert MODEL_KEY not in listed.text and ENV_KEY not in listed.text
    tag = new_user("allowed")
    answer = await ask(strict_server, people, int(response.json()["id"]), tag)
    assert answer.end is not None and answer.end["status"] == "completed", answer
    assert model.find(tag)[-1].authorization == f"Bearer {MODEL_KEY}"


async def test_an_agent_stored_under_a_looser_policy_is_stopped_before_its_call(
    tmp_path: Path, model: FakeOpenAI, attacker: FakeOpenAI
) -> None:
    """The operator once allowed the attacker's URL (and `*`), then removed it: the agent
    still in the database calls nobody, and the operator's own key never left."""
    data_dir = tmp_path / "data"
    loose = start_server(
        data_dir, **policy_env(model, AGENT_ALLOWED_BASE_URLS=f"{attacker.base_url},*")
    )
    try:
        people = People(loose, TokenCodec(TEST_SECRET))
        created = await create_agent(people, {"base_url": attacker.base_url})
        assert created.status_code == 201, created.text
        agent_id = int(created.json()["id"])
        # Allowed, it gets no operator key: OPENAI_API_KEY goes to OPENAI_BASE_URL only.
        tag = new_user("loose")
        answer = await ask(loose, people, agent_id, tag)
        assert answer.end is not None and answer.end["status"] == "completed", answer
        assert attacker.find(tag)[-1].authorization == "Bearer not-needed"
        # `*` admits public addresses only: loopback and link-local need a listed prefix.
        for url in ("http://127.0.0.2:1/v1", "http://169.254.169.254/v1"):
            refused = await create_agent(people, {"base_url": url})
            assert refused.status_code == 422, refused.text
        await people.aclose()
    finally:
        loose.stop()

    strict = start_server(data_dir, **policy_env(model))
    try:
        people = People(strict, TokenCodec(TEST_SECRET))
        tag = new_user("strict")
        answer = await ask(strict, people, agent_id, tag)
        assert answer.end is not None and answer.end["status"] == "error", answer
        assert attacker.find(tag) == []
        assert answer.errors and "AGENT_ALLOWED_BASE_URLS" in answer.errors[0]["message"]
        await people.aclose()
    finally:
        strict.stop()
