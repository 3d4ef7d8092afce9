"""Settings: every knob of the service, read from the environment and `.env`.

Names follow the environment variables of the A2G-compatible REST contract, so an existing
deployment's `.env` works as is.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated, Literal

from platformdirs import user_data_path
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The sample secret printed in the A2G-compatible contract's setup guide; refusing it outside
# DEBUG keeps a copied example config from reaching production with a public signing key.
SAMPLE_JWT_SECRET = "local-dev-secret-key-change-in-production"
SECRET_FILE_NAME = "jwt_secret"


class ConfigError(Exception):
    """A setting that makes starting impossible; the message is one line for the operator."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    service_name: str = "chat-service"
    service_port: int = Field(8003, ge=1, le=65535)
    debug: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    # Where the embedded defaults live: the SQLite file, the generated JWT secret and local
    # files. A per-user directory rather than the working directory, so that `serve` and
    # `token` started from different directories find the same secret.
    data_dir: Path = Field(default_factory=lambda: default_data_dir())

    database_url: str = ""
    database_pool_size: int = Field(20, ge=1)
    database_max_overflow: int = Field(40, ge=0)

    jwt_secret_key: str = ""
    jwt_algorithm: Literal["HS256", "HS384", "HS512"] = "HS256"

    ws_max_connections: int = Field(1000, ge=1)
    ws_heartbeat_interval: float = Field(30, gt=0)
    ws_connection_timeout: float = Field(300, gt=0)
    ws_message_size_limit: int = Field(65536, ge=64)
    # Frames a connection may have waiting to be written before it counts as too slow.
    ws_send_queue_size: int = Field(1024, ge=1)
    # Off by default: compressing each frame per connection undoes encoding it once per
    # room, and chat frames are small. Worth turning on for slow mobile links.
    ws_per_message_deflate: bool = False
    # Seconds one frame may take to reach the socket before the client counts as too slow.
    ws_write_timeout: float = Field(15, gt=0)
    # Largest request line + headers (the WebSocket handshake's too); 431 above.
    max_request_header_bytes: int = Field(32_768, ge=4096)

    # Scale-out: with REDIS_URL set, pub/sub, presence and rate limits go through Redis
    # and several instances can serve one conversation.
    redis_url: str = ""
    redis_max_connections: int = Field(50, ge=2)
    redis_pool_size: int = Field(10, ge=1)  # connections opened at start-up

    rate_limit_enabled: bool = False
    rate_limit_messages_per_minute: int = Field(60, ge=1)

    # Agents: the demo backend's pacing, how long answers stay resumable (2 h),
    # upstream limits, and defaults for OpenAI-compatible agents without their own.
    stream_chunk_size: int = Field(10, ge=1)
    stream_delay_ms: int = Field(50, ge=0)
    stream_buffer_ttl: int = Field(7200, ge=10)
    agent_timeout: float = Field(120, gt=0)
    agent_stall_timeout: float = Field(30, gt=0)
    # On shutdown, answers being generated get this long to finish before they are stored
    # as they stand; questions left unanswered are taken up by the periodic check.
    agent_shutdown_grace: float = Field(10, ge=0)
    agent_orphan_check_interval: float = Field(15, gt=0)
    # One instance answers a session at a time, under a lease it renews every third of
    # this; an instance stalled for longer stops answering and another takes over.
    agent_lease_seconds: float = Field(15, ge=1)
    agent_context_messages: int = Field(40, ge=1)
    agent_context_chars: int = Field(12_000, ge=100)
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: str = ""
    openai_model: str = "gpt-4o-mini"
    # What agent settings may point at (see agents/policy.py): URL prefixes beyond
    # OPENAI_BASE_URL ("*" = any public address), and the environment variables that
    # `api_key_env` may name. Both empty by default.
    agent_allowed_base_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    agent_api_key_env_allowed: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Largest JSON request body any REST endpoint accepts (uploads have MAX_FILE_SIZE).
    max_request_body: int = Field(1_048_576, ge=1024)

    # Files: local directory by default, S3/MinIO with FILE_STORAGE_TYPE=s3.
    # S3 credentials come from the standard AWS variables (AWS_ACCESS_KEY_ID, …).
    file_storage_type: Literal["local", "s3"] = "local"
    file_storage_path: Path | None = None  # default: DATA_DIR/storage
    s3_bucket_name: str = "chat-files"
    s3_endpoint_url: str = ""
    s3_region: str = ""
    max_file_size: int = Field(10_485_760, ge=1)
    allowed_file_types: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [
            "image/jpeg",
            "image/png",
            "image/gif",
            "image/webp",
            "application/pdf",
            "text/plain",
        ]
    )
    thumbnail_size: int = Field(320, ge=16, le=2048)
    # Images above this many pixels are refused before decoding (decompression bombs).
    max_image_pixels: int = Field(40_000_000, ge=1)

    # Transcripts and archives of ended sessions. Durations are seconds or "5m", "60h", "2d".
    transcript_language: Literal["en", "ko"] = "en"
    transcript_timezone: str = "UTC"  # an IANA zone for the times a transcript shows
    archive_snapshot_interval: float = Field(300, gt=0)
    archive_snapshot_keep: int = Field(3, ge=1)
    session_idle_timeout: float = Field(216_000, gt=0)
    session_idle_check_interval: float = Field(300, gt=0)

    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("transcript_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(value)
        except Exception:
            raise ValueError(f"{value!r} is not an IANA time zone (e.g. Asia/Seoul)") from None
        return value

    @field_validator(
        "archive_snapshot_interval",
        "session_idle_timeout",
        "session_idle_check_interval",
        mode="before",
    )
    @classmethod
    def _parse_duration(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_duration(value)
        return value

    @field_validator(
        "cors_origins",
        "allowed_file_types",
        "agent_allowed_base_urls",
        "agent_api_key_env_allowed",
        mode="before",
    )
    @classmethod
    def _parse_list(cls, value: object) -> object:
        # The A2G-compatible REST contract writes a JSON list; comma-separated works too.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import orjson

                return orjson.loads(text)
            return [item.strip() for item in text.split(",") if item.strip()]
        return value

    @field_validator("agent_allowed_base_urls")
    @classmethod
    def _check_base_urls(cls, value: list[str]) -> list[str]:
        for entry in value:
            if entry != "*" and not entry.startswith(("http://", "https://")):
                raise ValueError(f"{entry!r} is neither * nor an http(s):// URL prefix")
        return value

    @property
    def effective_database_url(self) -> str:
        """The configured URL with an async driver, or the embedded SQLite file."""
        url = self.database_url or f"sqlite:///{(self.data_dir / 'chat.db').resolve()}"
        return async_database_url(url)

    @property
    def effective_file_storage_path(self) -> Path:
        return self.file_storage_path or self.data_dir / "storage"

    @property
    def is_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")

    @property
    def jwt_secret_file(self) -> Path:
        return self.data_dir / SECRET_FILE_NAME

    def existing_jwt_secret(self) -> str:
        """The secret the server signs with, never a new one: for minting tokens.

        Inventing a secret here would mint tokens the server rejects ("Signature
        verification failed") whenever the server runs with another data directory.
        """
        if self.jwt_secret_key:
            return self.resolve_jwt_secret()
        path = self.jwt_secret_file
        if not path.exists():
            raise ConfigError(
                f"no signing secret in {self.data_dir} yet: start the server once with this "
                "DATA_DIR (chat-service serve), or set JWT_SECRET_KEY to the server's secret"
            )
        return path.read_text().strip()

    def resolve_jwt_secret(self) -> str:
        """The signing secret: configured, or generated once and kept in the data directory."""
        if self.jwt_secret_key:
            if self.jwt_secret_key == SAMPLE_JWT_SECRET and not self.debug:
                raise ConfigError(
                    "JWT_SECRET_KEY is the public sample value from the docs; set a real secret "
                    "(or unset it to have one generated) or run with DEBUG=true."
                )
            return self.jwt_secret_key
        path = self.jwt_secret_file
        if path.exists():
            return path.read_text().strip()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(48)
        # O_EXCL: two processes starting together must not both write a different secret.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_text().strip()
        with os.fdopen(fd, "w") as handle:
            handle.write(secret)
        return secret


def default_data_dir() -> Path:
    """The per-user data directory, e.g. `~/.local/share/chat-service` on Linux."""
    return user_data_path("chat-service", appauthor=False)


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds from "300", "300s", "5m", "60h" or "2d"."""
    value = text.strip().lower()
    unit = _DURATION_UNITS.get(value[-1:], 0)
    number = value[:-1] if unit else value
    try:
        return float(number) * (unit or 1)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a duration (seconds, or a number with s/m/h/d)"
        ) from None


def async_database_url(url: str) -> str:
    """Pick the async driver for the URL forms users write (`postgresql://`, `sqlite:///`).

    libpq's `sslmode=` becomes asyncpg's `ssl=`, so a URL copied from elsewhere works.
    """
    if url.startswith(("postgresql", "postgres:")):
        url = url.replace("sslmode=", "ssl=")
    for prefix, driver in (
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
        ("postgresql+psycopg2://", "postgresql+asyncpg://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if url.startswith(prefix):
            return driver + url[len(prefix) :]
    return url
