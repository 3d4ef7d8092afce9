"""What every bench script's `main` does: the event loop, signals, exit status, the
command-line options scripts share, and the command line as it was run."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import shlex
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from multiprocessing.connection import Connection
from typing import Any, TypeVar

T = TypeVar("T")


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (it comes with uvicorn[standard]), else the default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_async(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(main)


def stop_child(
    process: mp.process.BaseProcess, pipe: Connection, farewell: object, wait: float
) -> None:
    """End a multiprocessing child: `farewell` down its pipe, then SIGTERM, then SIGKILL."""
    with contextlib.suppress(Exception):
        pipe.send(farewell)
    process.join(wait)
    if process.is_alive():
        process.terminate()
        process.join(5)
    if process.is_alive():
        process.kill()
        process.join(5)
    pipe.close()


def interrupt_on_signals() -> None:
    """Ctrl-C and SIGTERM both end the run through KeyboardInterrupt, so every `finally`
    on the way out closes connections and stops what the run started. SIGINT is set
    explicitly: a shell may ignore it in background jobs."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: os.kill(os.getpid(), signal.SIGINT))


def guarded(body: Callable[[], int], verbose: bool) -> int:
    """`body()`'s exit status; 130 when interrupted, 2 when it raised (the run could not be
    carried out), with the traceback only when `verbose`."""
    interrupt_on_signals()
    try:
        return body()
    except KeyboardInterrupt:
        print("interrupted; servers and temporary data cleaned up", file=sys.stderr)
        return 130
    except Exception as exc:
        if verbose:
            raise
        print(f"error: {type(exc).__name__}: {exc} (--verbose for the traceback)", file=sys.stderr)
        return 2


def add_run_args(parser: argparse.ArgumentParser, profile_to: str) -> None:
    """--wait-quiet, --db-pool, --server-profile, --keep and --verbose."""
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each measurement, wait up to this long for an idle machine (other "
        "processes skew the figures; the report shows how busy it was either way)",
    )
    parser.add_argument(
        "--db-pool",
        type=int,
        default=20,
        help="PostgreSQL: DATABASE_POOL_SIZE per instance, with DATABASE_MAX_OVERFLOW=0",
    )
    parser.add_argument(
        "--server-profile",
        metavar="PATH",
        help=f"run the servers under cProfile, written to {profile_to} (slows them; for "
        "finding hot spots, not for figures)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (server logs)")
    parser.add_argument("--verbose", action="store_true", help="tracebacks and server logs")


def echo_command(script: str, args: argparse.Namespace, names: Sequence[str]) -> str:
    """The command as typed, and as it would read with every option spelled out."""
    typed = shlex.join([".venv/bin/python", script, *sys.argv[1:]])
    full: list[str] = []
    for name in names:
        value = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            full += [flag] if value else []
        elif value is not None:
            full += [flag, str(value)]
    return f"command: {typed}\n  = {shlex.join([script, *full])}"
