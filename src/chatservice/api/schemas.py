"""Request bodies. Strict types: `"seq": "5"` is a 422, not a guess.

The OpenAPI document generated from these says what the service really accepts, so that
every request valid by it is accepted (schemathesis checks this against a real server).
Rules the services enforce with codes of their own (EMPTY_CONTENT, …) are only described
here (`json_schema_extra`), not enforced a second time.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
)
from typing_extensions import TypeAliasType

from chatservice.values import MAX_ROW_INT

# Every character `str.strip()` removes (`str.isspace`), spelled out: `\s` means
# different sets in Python, ECMA-262 and Rust regexes.
_SPACE = "\t\n\x0b\x0c\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# Described, not enforced: a text with at least one character that is not whitespace
# (refused as EMPTY_CONTENT, VALIDATION_ERROR, … by the services).
NOT_BLANK: dict[str, Any] = {"minLength": 1, "pattern": f"[^{_SPACE}]"}


def integral(value: object) -> object:
    """A `field_validator(mode="before")` for integers: JSON has one number type, so `5.0`
    is the integer 5 (JSON Schema agrees); `"5"` and `true` stay refused by StrictInt."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# The largest integer a body's number may carry where 64 bits would do: 2**53 - 1, exact
# in every JSON parser (RFC 7493) and in the document, whose bounds FastAPI writes as
# floats: 2**63 - 1 would be printed 9.223372036854776e+18, which validators read as
# 9223372036854776000, so they would call 2**63 + 191 valid.
MAX_JSON_INT = 2**53 - 1
# What a JSON object the service stores (metadata, agent settings) may hold. PostgreSQL's
# JSONB keeps numbers as NUMERIC and gives 1e20 back as the integer 100000000000000000000,
# which orjson cannot write (64 bits at most): every later answer carrying it failed, on
# PostgreSQL only. Numbers there stay within ±MAX_JSON_INT.
_IN_JSON_RANGE = Field(ge=-MAX_JSON_INT, le=MAX_JSON_INT)
if TYPE_CHECKING:  # mypy cannot follow a recursive TypeAliasType; pydantic needs one
    JSONValue: TypeAlias = (
        bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None
    )
else:
    JSONValue = TypeAliasType(
        "JSONValue",
        StrictBool
        | Annotated[StrictInt, _IN_JSON_RANGE]
        | Annotated[StrictFloat, _IN_JSON_RANGE]
        | StrictStr
        | list["JSONValue"]
        | dict[str, "JSONValue"]
        | None,
    )


def _numbers_in_range(value: object, handler: ValidatorFunctionWrapHandler) -> object:
    # In a value parsed from JSON only a number out of range can be refused: say that
    # once, not once per member of the union.
    try:
        return handler(value)
    except ValidationError:
        raise ValueError("numbers must be within ±(2**53 - 1)") from None


def _object_in_range(value: object, handler: ValidatorFunctionWrapHandler) -> object:
    if not isinstance(value, dict):
        return handler(value)  # not an object at all: pydantic says so
    return _numbers_in_range(value, handler)


JSONObject = Annotated[dict[str, JSONValue], WrapValidator(_object_in_range)]
AnyJSON = Annotated[JSONValue, WrapValidator(_numbers_in_range)]

# The OpenAPI `date-time` format (RFC 3339 `date-time`), the only form of time accepted;
# and, for query strings whose `+` was not escaped, a space in its place.
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"([Zz]|[-+ ][0-9]{2}:[0-9]{2})"
)
# An RFC 3339 time that is no UTC `datetime` (0001-01-01T00:00:00+01:00): refused with this.
OUT_OF_RANGE = "is outside the years 1-9999 once in UTC"


def moment(text: str, where: str) -> datetime:
    """An RFC 3339 date-time as an aware datetime that has a UTC equivalent.

    pydantic alone takes `"0"` (a Unix time) and times without an offset, which the
    document does not allow and which fail later (naive and aware times do not compare),
    and times near year 1 or 9999 whose conversion to UTC overflows when rendered.
    """
    if not _RFC3339.fullmatch(text):
        raise ValueError(f"{where} must be an RFC 3339 date-time, e.g. 2025-01-31T09:00:00Z")
    try:
        parsed = datetime.fromisoformat(text.upper().replace("Z", "+00:00").replace(" ", "+"))
    except ValueError:
        raise ValueError(f"{where} must be an RFC 3339 date-time (no such date or time)") from None
    try:
        parsed.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{where} {OUT_OF_RANGE}") from None
    return parsed


def _moment(value: object) -> object:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 date-time string")  # not a Unix time
    return moment(value, "the time")


# A user id as the services take it: 1-100 characters once stripped, not blank.
UserId = Annotated[StrictStr, Field(max_length=100, json_schema_extra=NOT_BLANK)]


class _Body(BaseModel):
    # Fields a body does not name are not used, but they are checked like the rest (a
    # client's typo must not hide a NUL or an out-of-range number) and documented so.
    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, AnyJSON] = Field(init=False)


class CreateSession(_Body):
    # How `kind`, `agent_id` and `participants` go together (services/sessions.py).
    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                {
                    "if": {"properties": {"kind": {"const": "agent"}}, "required": ["kind"]},
                    "then": {
                        "properties": {"agent_id": {"type": "integer"}},
                        "required": ["agent_id"],
                    },
                },
                {
                    "if": {
                        "properties": {"kind": {"enum": ["direct", "group"]}},
                        "required": ["kind"],
                    },
                    "then": {"properties": {"agent_id": {"type": "null"}}},
                },
                {
                    # exactly one other user (not the caller)
                    "if": {"properties": {"kind": {"const": "direct"}}, "required": ["kind"]},
                    "then": {
                        "properties": {"participants": {"minItems": 1, "maxItems": 1}},
                        "required": ["participants"],
                    },
                },
            ]
        }
    )

    agent_id: StrictInt | None = Field(None, ge=1, le=MAX_ROW_INT)
    title: StrictStr | None = Field(None, max_length=200)
    metadata: JSONObject | None = None
    kind: Literal["agent", "direct", "group"] | None = None
    participants: list[UserId] = Field(default_factory=list, max_length=1000)
    scheduled_at: Annotated[AwareDatetime | None, BeforeValidator(_moment)] = None

    _agent_id = field_validator("agent_id", mode="before")(integral)


class SendMessage(_Body):
    content: StrictStr = Field(json_schema_extra=NOT_BLANK)
    message_type: Literal["text"] = "text"
    metadata: JSONObject | None = None
    client_msg_id: StrictStr | None = Field(None, min_length=1, max_length=100)


class MarkRead(_Body):
    seq: StrictInt = Field(ge=0, le=MAX_JSON_INT)

    _seq = field_validator("seq", mode="before")(integral)


class AddParticipants(_Body):
    user_ids: list[UserId] = Field(min_length=1, max_length=1000)


class EditMessage(_Body):
    # A text message's content may not be blank; a file message's caption may be emptied.
    content: StrictStr
