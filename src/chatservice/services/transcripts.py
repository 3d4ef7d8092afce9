"""Transcripts: a session's history as text, in the consultation transcript layout
(`formatChatLog` of the consultation chat), and as JSON.

Formatting only: the archive service gathers the session, its files and its messages a
page at a time and hands them here. The text layout is the consultation transcript layout:
a banner, the session, the generation time and the message count, then one block per message (time,
sender name and id, content) between separators, and a closing banner; an empty session
is one line.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO
from zoneinfo import ZoneInfo

import orjson

from chatservice.domain import (
    JSON,
    FileRecord,
    Message,
    MessageType,
    SenderType,
    SessionDetail,
    as_utc,
    isoformat,
)

RULE = "=" * 50
SEPARATOR = "-" * 50
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


@dataclass(frozen=True, slots=True)
class Labels:
    title: str
    session: str
    generated: str
    count: str
    sender: str
    content: str
    file: str
    end: str
    empty: str


# `ko` is the consultation chat's Korean wording, word for word; `en` the same layout in
# English.
LABELS: Mapping[str, Labels] = {
    "en": Labels(
        title="Chat transcript",
        session="Session",
        generated="Generated at",
        count="Total messages",
        sender="From",
        content="Content",
        file="File",
        end="End of transcript",
        empty="There are no messages in this chat.",
    ),
    "ko": Labels(
        title="상담 채팅 기록",
        session="상담 요청 번호",
        generated="생성 일시",
        count="총 메시지 수",
        sender="발신",
        content="내용",
        file="첨부 파일",
        end="채팅 기록 끝",
        empty="채팅 내역이 없습니다.",
    ),
}


@dataclass(slots=True)
class TranscriptContext:
    """Who is who in a session, so each block can name its sender."""

    detail: SessionDetail
    zone: ZoneInfo
    generated_at: datetime
    files: dict[str, FileRecord]  # by message_id

    def sender_name(self, message: Message) -> str:
        if message.sender_type == SenderType.AGENT:
            agent = self.detail.agent
            return agent.name if agent is not None else "agent"
        if message.sender_type == SenderType.SYSTEM:
            return "system"
        for participant in self.detail.participants:
            if participant.user_id == message.sender_id:
                return participant.display_name or participant.user_id
        return message.sender_id

    def local(self, moment: datetime) -> str:
        return as_utc(moment).astimezone(self.zone).strftime(TIME_FORMAT)


def _content(message: Message, context: TranscriptContext, labels: Labels) -> str:
    text = message.content or ""
    status = (message.metadata or {}).get("status")
    if message.message_type == MessageType.STREAM and status not in (None, "completed"):
        text = f"{text} [{status}]"
    record = context.files.get(message.message_id)
    if record is not None:
        attached = (
            f"{labels.file}: {record.file_name} ({record.file_type}, {record.file_size} bytes) "
            f"{record.url}"
        )
        text = f"{text}\n{attached}" if text else attached
    return text


def _text_block(message: Message, context: TranscriptContext, labels: Labels) -> str:
    return (
        f"[{context.local(message.created_at)}]\n"
        f"{labels.sender}: {context.sender_name(message)} ({message.sender_id})\n"
        f"{labels.content}: {_content(message, context, labels)}\n"
        f"{SEPARATOR}\n"
    )


def _json_message(message: Message, context: TranscriptContext) -> JSON:
    record = context.files.get(message.message_id)
    return {
        "message_id": message.message_id,
        "seq": message.seq,
        "sender_type": message.sender_type,
        "sender_id": message.sender_id,
        "sender_name": context.sender_name(message),
        "message_type": message.message_type,
        "content": message.content,
        "metadata": message.metadata,
        "is_edited": message.is_edited,
        "edited_at": isoformat(message.edited_at),
        "created_at": isoformat(message.created_at),
        "file": record.info() if record is not None else None,
    }


def _json_session(context: TranscriptContext) -> JSON:
    detail = context.detail
    session = detail.session
    return {
        "session_id": session.session_id,
        "title": session.title,
        "kind": session.kind,
        "status": session.status,
        "agent": None
        if detail.agent is None
        else {"id": detail.agent.id, "name": detail.agent.name},
        "participants": [
            {"user_id": p.user_id, "display_name": p.display_name, "role": p.role}
            for p in detail.participants
        ],
        "created_at": isoformat(session.created_at),
        "started_at": isoformat(session.started_at),
        "ended_at": isoformat(session.ended_at),
    }


class TranscriptWriter:
    """One transcript written a page of messages at a time, so the memory it takes does
    not grow with the session: a long session's transcript built in one piece stays
    behind as the allocator's high-water mark, job after job.

    The messages go to a temporary file as they come; `finish` puts the header (which
    counts them) in front and the footer behind, into a second file, and hands that over
    rewound. The calls do file I/O: run them off the event loop.
    """

    def __init__(self, context: TranscriptContext, fmt: str, language: str = "en") -> None:
        self.context = context
        self.fmt = fmt
        self.count = 0
        self._labels = LABELS[language]
        self._body: BinaryIO = tempfile.TemporaryFile()  # closed by finish or close

    def add(self, messages: Iterable[Message]) -> None:
        body, context = self._body, self.context
        for message in messages:
            if self.fmt == "text":
                body.write(_text_block(message, context, self._labels).encode())
            else:
                if self.count:
                    body.write(b",")
                body.write(orjson.dumps(_json_message(message, context)))
            self.count += 1

    def finish(self) -> BinaryIO:
        """The whole transcript, positioned at its start; the caller closes it."""
        whole: BinaryIO = tempfile.TemporaryFile()  # the caller's to close
        try:
            head, tail = self._text_ends() if self.fmt == "text" else self._json_ends()
            whole.write(head)
            self._body.seek(0)
            shutil.copyfileobj(self._body, whole)
            whole.write(tail)
            whole.seek(0)
        except BaseException:
            whole.close()
            raise
        finally:
            self._body.close()
        return whole

    def close(self) -> None:
        self._body.close()

    def _text_ends(self) -> tuple[bytes, bytes]:
        labels, context = self._labels, self.context
        if self.count == 0:
            return labels.empty.encode(), b""
        session = context.detail.session
        title = f" ({session.title})" if session.title else ""
        header = (
            f"{RULE}\n       {labels.title}\n{RULE}\n\n"
            f"{labels.session}: {session.session_id}{title}\n"
            f"{labels.generated}: {context.local(context.generated_at)}\n"
            f"{labels.count}: {self.count}\n"
            f"\n{RULE}\n\n"
        )
        return header.encode(), f"\n{RULE}\n{labels.end}\n{RULE}\n".encode()

    def _json_ends(self) -> tuple[bytes, bytes]:
        context = self.context
        head: JSON = {
            "session": _json_session(context),
            "generated_at": isoformat(context.generated_at),
            "message_count": self.count,
        }
        files = [record.info() for record in context.files.values()]
        # The object's closing brace gives way to the messages array, then the files.
        return (
            orjson.dumps(head)[:-1] + b',"messages":[',
            b'],"files":' + orjson.dumps(files) + b"}",
        )
