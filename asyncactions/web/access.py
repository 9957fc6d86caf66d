"""Who may do what: the bearer token, the signed session cookie, CSRF tokens.

Standard library only, so the CLI can check a host before the web extra is imported.
Sessions are not stored anywhere: the cookie carries its expiry and a nonce, signed
with a key derived from the token, so changing the token signs everyone out.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import time
from dataclasses import dataclass, field

COOKIE = "asyncactions_session"
SESSION_SECONDS = 12 * 3600


def is_loopback(host: str) -> bool:
    """127.0.0.1, ::1, localhost: reachable from this machine only."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _mac(key: bytes, message: str) -> str:
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Access:
    """The access rules of one app: its token (None: loopback only) and read-only flag."""

    token: str | None = None
    read_only: bool = False
    # Without a token there are no sessions, but dashboard forms still carry a CSRF token
    # derived from this per-app secret (a page on another site cannot read it).
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    @property
    def _key(self) -> bytes:
        seed = self.token.encode() if self.token else self.secret
        return hmac.new(seed, b"asyncactions web session", hashlib.sha256).digest()

    def token_matches(self, given: str | None) -> bool:
        """Constant-time: the comparison takes as long whatever the guess."""
        if not self.token or given is None:
            return False
        return hmac.compare_digest(given.encode(), self.token.encode())

    def new_session(self, now: float | None = None) -> str:
        expires = int((now or time.time()) + SESSION_SECONDS)
        body = f"{expires}.{secrets.token_hex(16)}"
        return f"{body}.{_mac(self._key, body)}"

    def session_nonce(self, cookie: str | None, now: float | None = None) -> str | None:
        """The nonce of a valid, unexpired session cookie, else None."""
        if not self.token or not cookie or cookie.count(".") != 2:
            return None
        expires, nonce, signature = cookie.split(".")
        if not hmac.compare_digest(signature, _mac(self._key, f"{expires}.{nonce}")):
            return None
        if not expires.isdigit() or int(expires) < (now or time.time()):
            return None
        return nonce

    def csrf_token(self, nonce: str | None) -> str:
        """Bound to the session (or, without a token, to this app)."""
        return _mac(self._key, f"csrf.{nonce or ''}")

    def csrf_ok(self, nonce: str | None, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(),
                                                         self.csrf_token(nonce).encode())


def token_from_env() -> str | None:
    return os.environ.get("ASYNCACTIONS_WEB_TOKEN") or None
