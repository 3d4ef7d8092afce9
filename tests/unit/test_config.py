from __future__ import annotations

import stat
from pathlib import Path

import pytest

from chatservice.config import SAMPLE_JWT_SECRET, ConfigError, Settings, async_database_url


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:p@db:5432/chat", "postgresql+asyncpg://u:p@db:5432/chat"),
        ("postgres://u@db/chat", "postgresql+asyncpg://u@db/chat"),
        ("postgresql+asyncpg://u@db/chat", "postgresql+asyncpg://u@db/chat"),
        ("postgresql://u@db/chat?sslmode=require", "postgresql+asyncpg://u@db/chat?ssl=require"),
        ("sqlite:////var/lib/chat.db", "sqlite+aiosqlite:////var/lib/chat.db"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
    ],
)
def test_database_urls_get_an_async_driver(given: str, expected: str) -> None:
    assert async_database_url(given) == expected


def test_default_database_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    config = settings(data_dir=tmp_path)
    assert config.is_sqlite
    assert config.effective_database_url == f"sqlite+aiosqlite:///{tmp_path.resolve()}/chat.db"


def test_a_secret_is_generated_once_and_kept_private(tmp_path: Path) -> None:
    first = settings(data_dir=tmp_path / "data").resolve_jwt_secret()
    second = settings(data_dir=tmp_path / "data").resolve_jwt_secret()
    assert first == second and len(first) >= 32
    mode = stat.S_IMODE((tmp_path / "data" / "jwt_secret").stat().st_mode)
    assert mode == 0o600


def test_a_configured_secret_wins(tmp_path: Path) -> None:
    assert settings(data_dir=tmp_path, jwt_secret_key="s3cret").resolve_jwt_secret() == "s3cret"
    assert not (tmp_path / "jwt_secret").exists()


def test_the_sample_secret_is_refused_outside_debug(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sample"):
        settings(data_dir=tmp_path, jwt_secret_key=SAMPLE_JWT_SECRET).resolve_jwt_secret()
    allowed = settings(data_dir=tmp_path, jwt_secret_key=SAMPLE_JWT_SECRET, debug=True)
    assert allowed.resolve_jwt_secret() == SAMPLE_JWT_SECRET


def test_a2g_style_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVICE_PORT", "9000")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    monkeypatch.setenv("CORS_ORIGINS", '["http://localhost:9060", "http://localhost:9050"]')
    monkeypatch.setenv("WS_MESSAGE_SIZE_LIMIT", "65536")
    config = settings()
    assert config.service_port == 9000
    assert config.log_level == "DEBUG"
    assert config.cors_origins == ["http://localhost:9060", "http://localhost:9050"]
    assert config.ws_message_size_limit == 65536


def test_comma_separated_origins_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORS_ORIGINS", "http://a.example, http://b.example")
    assert settings().cors_origins == ["http://a.example", "http://b.example"]
