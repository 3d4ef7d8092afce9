"""Sending messages: seq numbering, idempotent retries, validation, publication."""

from __future__ import annotations

from typing import Any

import pytest

from chatservice import events
from chatservice.components import Components
from chatservice.services.errors import InvalidInput, TooLarge
from chatservice.services.messages import Draft
from tests.integration.helpers import BusTap, as_utc, group, send, users


async def test_seqs_count_from_one_per_session(parts: Components) -> None:
    alice, bob = users(2)
    first = await group(parts, alice, bob)
    second = await group(parts, bob)
    assert [await send(parts, alice, first, "a1"), await send(parts, bob, first, "b1")] == [1, 2]
    assert await send(parts, bob, second, "other session") == 1
    assert await send(parts, alice, first, "a2") == 3
    page = await parts.messages.page(alice, first, before=None, after=None, limit=50)
    assert [(m.seq, m.sender_id, m.content) for m in page.messages] == [
        (1, alice.user_id, "a1"),
        (2, bob.user_id, "b1"),
        (3, alice.user_id, "a2"),
    ]


async def test_a_stored_message_keeps_what_was_sent(parts: Components) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    result = await parts.messages.send(
        alice,
        sid,
        Draft(
            content="안녕하세요 👋 hello",
            metadata={"reply_to": 3, "tags": ["x"]},
            client_msg_id="c-1",
        ),
    )
    assert result.created is True
    sent = result.message
    assert sent.message_id.startswith("msg_")
    assert (sent.session_id, sent.seq, sent.sender_type, sent.message_type) == (
        sid,
        1,
        "user",
        "text",
    )
    (stored,) = (await parts.messages.page(bob, sid, before=None, after=None, limit=5)).messages
    assert stored.message_id == sent.message_id
    assert stored.sender_id == alice.user_id
    assert stored.content == "안녕하세요 👋 hello"
    assert stored.metadata == {"reply_to": 3, "tags": ["x"]}
    assert stored.client_msg_id == "c-1"
    assert stored.is_edited is False
    assert as_utc(stored.created_at) == as_utc(sent.created_at)


async def test_send_publishes_one_message_event_on_the_session_channel(
    parts: Components,
) -> None:
    alice = users(1)[0]
    sid = await group(parts, alice)
    tap = BusTap()
    await parts.bus.subscribe([events.session_channel(sid)], tap)
    try:
        result = await parts.messages.send(alice, sid, Draft(content="hi", client_msg_id="k"))
    finally:
        await parts.bus.unsubscribe([events.session_channel(sid)], tap)
    (event,) = tap.events
    assert event["type"] == "message"
    assert event["message_id"] == result.message.message_id
    assert (event["seq"], event["content"], event["client_msg_id"]) == (1, "hi", "k")
    assert event["sender_id"] == alice.user_id
    assert event["timestamp"] == event["created_at"]
    assert event["timestamp"].endswith("Z")


# -- idempotent retries -------------------------------------------------------------------


async def test_a_retried_client_msg_id_returns_the_original(parts: Components) -> None:
    alice = users(1)[0]
    sid = await group(parts, alice)
    tap = BusTap()
    await parts.bus.subscribe([events.session_channel(sid)], tap)
    try:
        first = await parts.messages.send(alice, sid, Draft(content="once", client_msg_id="r1"))
        retry = await parts.messages.send(
            alice, sid, Draft(content="once (resent)", client_msg_id="r1")
        )
    finally:
        await parts.bus.unsubscribe([events.session_channel(sid)], tap)
    assert (first.created, retry.created) == (True, False)
    assert retry.message.message_id == first.message.message_id
    assert retry.message.seq == 1
    assert retry.message.content == "once"
    assert len(tap.of_type("message")) == 1  # the retry is not delivered again
    page = await parts.messages.page(alice, sid, before=None, after=None, limit=10)
    assert page.total == 1
    # The retry did not use up a seq either.
    assert await send(parts, alice, sid, "next") == 2


async def test_the_same_client_msg_id_from_another_sender_is_a_new_message(
    parts: Components,
) -> None:
    alice, bob = users(2)
    sid = await group(parts, alice, bob)
    a = await parts.messages.send(alice, sid, Draft(content="from alice", client_msg_id="same"))
    b = await parts.messages.send(bob, sid, Draft(content="from bob", client_msg_id="same"))
    assert (a.created, b.created) == (True, True)
    assert a.message.message_id != b.message.message_id
    assert (a.message.seq, b.message.seq) == (1, 2)
    assert b.message.sender_id == bob.user_id


async def test_the_same_client_msg_id_in_another_session_is_a_new_message(
    parts: Components,
) -> None:
    alice = users(1)[0]
    one, two = await group(parts, alice), await group(parts, alice)
    a = await parts.messages.send(alice, one, Draft(content="x", client_msg_id="same"))
    b = await parts.messages.send(alice, two, Draft(content="x", client_msg_id="same"))
    assert (a.created, b.created) == (True, True)
    assert (b.message.session_id, b.message.seq) == (two, 1)


# -- validation ---------------------------------------------------------------------------


async def _rejected(parts: Components, draft: Draft) -> Exception:
    alice = users(1)[0]
    sid = await group(parts, alice)
    with pytest.raises((InvalidInput, TooLarge)) as err:
        await parts.messages.send(alice, sid, draft)
    # Nothing was stored and no seq was used up.
    page = await parts.messages.page(alice, sid, before=None, after=None, limit=5)
    assert page.total == 0
    assert await send(parts, alice, sid, "valid") == 1
    return err.value


@pytest.mark.parametrize("content", ["", " ", "\n\t  \r\n"])
async def test_empty_content_is_rejected(parts: Components, content: str) -> None:
    err = await _rejected(parts, Draft(content=content))
    assert isinstance(err, InvalidInput)
    assert err.code == "EMPTY_CONTENT"


@pytest.mark.parametrize("content", [None, 42, ["text"], {"text": "hi"}, b"bytes"])
async def test_content_that_is_not_a_string_is_rejected(parts: Components, content: Any) -> None:
    err = await _rejected(parts, Draft(content=content))
    assert isinstance(err, InvalidInput)
    assert err.code == "VALIDATION_ERROR"


@pytest.mark.parametrize("message_type", ["stream", "file", "system", "TEXT", "image", None])
async def test_users_may_only_send_text(parts: Components, message_type: Any) -> None:
    err = await _rejected(parts, Draft(content="hi", message_type=message_type))
    assert isinstance(err, InvalidInput)


@pytest.mark.parametrize("metadata", [["a"], "string", 3, True])
async def test_metadata_must_be_an_object(parts: Components, metadata: Any) -> None:
    err = await _rejected(parts, Draft(content="hi", metadata=metadata))
    assert isinstance(err, InvalidInput)


async def test_oversized_metadata_is_rejected(parts: Components) -> None:
    err = await _rejected(parts, Draft(content="hi", metadata={"blob": "x" * 20_000}))
    assert isinstance(err, TooLarge)


@pytest.mark.parametrize("client_msg_id", ["", "c" * 101, 17, ["id"]])
async def test_malformed_client_msg_id_is_rejected(parts: Components, client_msg_id: Any) -> None:
    err = await _rejected(parts, Draft(content="hi", client_msg_id=client_msg_id))
    assert isinstance(err, InvalidInput)


async def test_client_msg_id_of_the_maximum_length_is_accepted(parts: Components) -> None:
    alice = users(1)[0]
    sid = await group(parts, alice)
    result = await parts.messages.send(alice, sid, Draft(content="hi", client_msg_id="c" * 100))
    assert result.message.client_msg_id == "c" * 100


async def test_content_of_exactly_the_byte_limit_is_accepted(parts: Components) -> None:
    alice = users(1)[0]
    sid = await group(parts, alice)
    limit = parts.messages.max_content_bytes
    assert limit == parts.settings.ws_message_size_limit
    emoji = "😀" * (limit // 4)  # four bytes each
    assert len(emoji.encode()) == limit
    for content in ("a" * limit, emoji):
        result = await parts.messages.send(alice, sid, Draft(content=content))
        (stored,) = (
            await parts.messages.page(
                alice, sid, before=None, after=str(result.message.seq - 1), limit=1
            )
        ).messages
        assert stored.content == content


async def test_content_over_the_byte_limit_is_too_large(parts: Components) -> None:
    limit = parts.messages.max_content_bytes
    err = await _rejected(parts, Draft(content="a" * (limit + 1)))
    assert isinstance(err, TooLarge)
    assert err.code == "CONTENT_TOO_LARGE"


@pytest.mark.parametrize(("char", "width"), [("é", 2), ("한", 3), ("😀", 4)])
async def test_multibyte_content_is_measured_in_utf8_bytes(
    parts: Components, char: str, width: int
) -> None:
    limit = parts.messages.max_content_bytes
    content = char * (limit // width + 1)
    assert len(content) < limit < len(content.encode())  # fits in characters, not in bytes
    err = await _rejected(parts, Draft(content=content))
    assert isinstance(err, TooLarge)
