"""What text and numbers the service accepts, whatever the transport and the database.

PostgreSQL refuses NUL characters in text and lone UTF-16 surrogates cannot be encoded
as UTF-8; NaN and the infinities are not JSON; and a number in a stored JSON value must
come back as it went in: PostgreSQL's JSONB returns 1e20 as the integer
100000000000000000000, which no 64-bit encoder writes, so JSON numbers stay within
±(2**53 - 1), the range every JSON parser reads exactly. Left to the drivers these fail
late and differently per database (a 500 on one, a stored value on the other), so every
value a client sends — REST bodies, path and query parameters, WebSocket frames, form
fields, token claims — is checked here first and refused with a message naming where the
problem is.
"""

from __future__ import annotations

import math

MIN_INT = -(2**63)
MAX_INT = 2**63 - 1  # query and path integers
MAX_JSON_NUMBER = 2**53 - 1  # numbers inside JSON bodies and frames
# Agent ids and sequence numbers live in 32-bit INTEGER columns: a larger one names
# nothing (ids) or means "after everything" (seq cursors), never a database error.
MAX_ROW_INT = 2**31 - 1
# Nesting deeper than this is refused before anything walks it recursively.
MAX_DEPTH = 32


class UnacceptableValue(ValueError):
    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}" if where else problem)
        self.where = where
        self.problem = problem


def check_text(text: str, where: str) -> None:
    if "\x00" in text:
        raise UnacceptableValue(where, "contains a NUL character")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise UnacceptableValue(where, "contains a lone surrogate") from None


def check_int(number: int, where: str) -> None:
    if not MIN_INT <= number <= MAX_INT:
        raise UnacceptableValue(where, "is outside the signed 64-bit range")


def check_json_number(number: float, where: str) -> None:
    if not math.isfinite(number):
        raise UnacceptableValue(where, "is not a finite number")
    if not -MAX_JSON_NUMBER <= number <= MAX_JSON_NUMBER:
        raise UnacceptableValue(where, "is outside ±(2**53 - 1)")


def check_json(value: object, where: str = "", depth: int = 0) -> None:
    """Every string (keys too), integer and float inside a parsed JSON value."""
    if isinstance(value, str):
        check_text(value, where)
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int | float):
        check_json_number(value, where)
    elif isinstance(value, dict):
        if depth >= MAX_DEPTH:
            raise UnacceptableValue(where, f"nests deeper than {MAX_DEPTH} levels")
        for key, item in value.items():
            inner = f"{where}.{key}" if where else str(key)
            check_text(str(key), inner)
            check_json(item, inner, depth + 1)
    elif isinstance(value, list):
        if depth >= MAX_DEPTH:
            raise UnacceptableValue(where, f"nests deeper than {MAX_DEPTH} levels")
        for index, item in enumerate(value):
            check_json(item, f"{where}[{index}]", depth + 1)
