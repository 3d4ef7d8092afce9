"""Which upstreams an agent may call and which credentials it may carry there.

An admin's agent settings name a `base_url` and may name `api_key_env`, an environment
variable holding the key. Unchecked, that lets an admin read any secret of the process:
`api_key_env: "JWT_SECRET_KEY"` with `base_url: "http://attacker/v1"` would send the
signing secret as a bearer token. So the operator decides, in configuration:

- `AGENT_API_KEY_ENV_ALLOWED`: the only variable names `api_key_env` may name;
- `AGENT_ALLOWED_BASE_URLS`: URL prefixes an agent may call. The default upstream
  (`OPENAI_BASE_URL`) is always allowed. The entry `*` admits any http(s) URL whose host
  is a public address; link-local, metadata, loopback and private addresses are reached
  only when a listed prefix names them.
- The default key (`OPENAI_API_KEY`) is sent only to the default upstream's origin.

The rules are checked when an agent is created and again before every upstream call, so
tightening the configuration also stops agents created under a looser one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

ANY_PUBLIC = "*"
# Cloud metadata endpoints by name; their addresses are link-local or private anyway.
_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})


class UpstreamRefused(ValueError):
    """Agent settings the operator's policy does not allow; the message says which rule."""


@dataclass(frozen=True)
class _Prefix:
    scheme: str
    host: str
    port: int
    path: str

    def admits(self, url: _Prefix) -> bool:
        if (url.scheme, url.host, url.port) != (self.scheme, self.host, self.port):
            return False
        base = self.path.rstrip("/")
        return url.path == base or url.path.startswith(base + "/") or not base


def _parse(url: str) -> _Prefix:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UpstreamRefused(f"base_url is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamRefused("base_url must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise UpstreamRefused("base_url must not carry credentials")
    default_port = 443 if parts.scheme == "https" else 80
    return _Prefix(parts.scheme, parts.hostname.lower(), port or default_port, parts.path or "/")


def _public(address: str) -> bool:
    return ipaddress.ip_address(address.split("%", 1)[0]).is_global


class UpstreamPolicy:
    def __init__(
        self,
        *,
        default_base_url: str,
        allowed_base_urls: Iterable[str] = (),
        allowed_key_envs: Iterable[str] = (),
    ) -> None:
        entries = [u.strip() for u in allowed_base_urls if u.strip()]
        self.any_public = ANY_PUBLIC in entries
        self.default = _parse(default_base_url)
        self.prefixes = [self.default, *(_parse(u) for u in entries if u != ANY_PUBLIC)]
        self.allowed_key_envs = frozenset(allowed_key_envs)

    def check(self, settings: Mapping[str, Any]) -> None:
        """Refuse settings naming a variable or an upstream the operator did not allow.

        Without DNS: a host name admitted only by `*` is resolved by `check_reachable`.
        """
        key_env = settings.get("api_key_env")
        if key_env is not None:
            if not isinstance(key_env, str) or key_env not in self.allowed_key_envs:
                raise UpstreamRefused(
                    "api_key_env must name a variable listed in AGENT_API_KEY_ENV_ALLOWED"
                )
        for name in ("api_key", "model", "system_prompt"):
            if settings.get(name) is not None and not isinstance(settings[name], str):
                raise UpstreamRefused(f"{name} must be a string")
        base_url = settings.get("base_url")
        if base_url is None:
            return
        if not isinstance(base_url, str):
            raise UpstreamRefused("base_url must be a string")
        self._admitted(_parse(base_url))

    def _admitted(self, url: _Prefix) -> bool:
        """True when a listed prefix admits the URL; False when only `*` may (host to check)."""
        if any(prefix.admits(url) for prefix in self.prefixes):
            return True
        if self.any_public and url.host not in _METADATA_HOSTS:
            try:
                address = ipaddress.ip_address(url.host.split("%", 1)[0])
            except ValueError:
                return False  # a host name: resolved before each call
            if address.is_global:
                return True
            raise UpstreamRefused(
                f"base_url host {url.host} is not a public address; list its URL in "
                "AGENT_ALLOWED_BASE_URLS to allow it"
            )
        raise UpstreamRefused("base_url is not allowed by AGENT_ALLOWED_BASE_URLS")

    async def check_reachable(self, settings: Mapping[str, Any]) -> None:
        """`check`, then for a host name admitted only by `*`, refuse non-public addresses.

        Resolved right before each call; a name that later resolves elsewhere (DNS
        rebinding) is caught at the next call, not mid-connection.
        """
        self.check(settings)
        base_url = settings.get("base_url")
        if not isinstance(base_url, str):
            return
        url = _parse(base_url)
        if self._admitted(url):
            return
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(url.host, url.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise UpstreamRefused(f"base_url host {url.host} does not resolve: {exc}") from None
        if not infos or not all(_public(str(info[4][0])) for info in infos):
            raise UpstreamRefused(
                f"base_url host {url.host} resolves to a non-public address; list its URL in "
                "AGENT_ALLOWED_BASE_URLS to allow it"
            )

    def may_send_default_key(self, base_url: str) -> bool:
        """The operator's OPENAI_API_KEY goes to the default upstream's origin only."""
        url = _parse(base_url)
        return (url.scheme, url.host, url.port) == (
            self.default.scheme,
            self.default.host,
            self.default.port,
        )
