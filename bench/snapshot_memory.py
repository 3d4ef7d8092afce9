"""Does the transcript snapshot job's memory grow with the sessions it snapshots?

The soak (`soak.md`) saw RSS rise in steps every `ARCHIVE_SNAPSHOT_INTERVAL` on the
instance running the snapshot job. This isolates that job: one process with the real
components on a fresh SQLite database, 50 group sessions, and rounds of "every session
gets `--per-round` more messages, then `ArchiveService.snapshot_changed()` snapshots them
all", printing the process's RSS after each round (after a full collection). A job whose
memory follows the largest transcript grows every round; one that works a page at a
time levels off.

    .venv/bin/python bench/snapshot_memory.py --rounds 12 --per-round 300

Point PYTHONPATH at another checkout's `src` to measure its code with the same script.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import tempfile
import time
from pathlib import Path

from harness.machine import rss_mib

from chatservice.app import build_components
from chatservice.config import Settings
from chatservice.domain import NewSession, Principal
from chatservice.services.messages import Draft
from chatservice.store.migrate import upgrade

SESSIONS = 50


async def run(rounds: int, per_round: int, workdir: Path) -> None:
    url = f"sqlite:///{workdir / 'chat.db'}"
    # In a thread: the migration runs an event loop of its own.
    await asyncio.to_thread(upgrade, url.replace("sqlite://", "sqlite+aiosqlite://", 1))
    settings = Settings(database_url=url, jwt_secret_key="s" * 40, data_dir=workdir, _env_file=None)
    parts = build_components(settings)
    await parts.blobs.start()
    await parts.bus.start()
    users = [Principal(f"user{i}") for i in range(3)]
    session_ids = []
    for i in range(SESSIONS):
        detail, _ = await parts.sessions.create(
            users[0], NewSession(kind="group", participants=["user1", "user2"], title=f"room {i}")
        )
        session_ids.append(detail.session.session_id)
    for r in range(rounds):
        for session_id in session_ids:
            session = await parts.sessions.store.get(session_id)
            assert session is not None
            for k in range(per_round):
                text = f"message {r}-{k} " + "x" * (40 + k % 200)
                await parts.messages.send_as_member(users[k % 3], session, Draft(content=text))
        gc.collect()
        before = rss_mib(os.getpid())
        began = time.monotonic()
        written = await parts.archives.snapshot_changed()
        gc.collect()
        after = rss_mib(os.getpid())
        print(
            f"round {r:2}: {written} snapshots of {(r + 1) * per_round} messages each in "
            f"{time.monotonic() - began:.1f} s; RSS {before:.1f} -> {after:.1f} MiB; "
            f"threads {len(os.listdir('/proc/self/task'))}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--per-round", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="snapshot-memory-") as workdir:
        asyncio.run(run(args.rounds, args.per_round, Path(workdir)))


if __name__ == "__main__":
    main()
