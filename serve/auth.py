"""API keys: who may call the gateway, and which tenant a request belongs to.

Keys come from a file (re-read when it changes, so keys rotate without a restart) and/or an environment
variable. A key is compared in constant time against every configured key, and never logged: logs and
errors name a key only by its tenant. The tenant salts the request's prefix-cache blocks (engine
`cache_salt`), so two tenants never share cached blocks and `cached_tokens` cannot tell one tenant
anything about another's prompts.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gptoss.errors import AuthenticationError, ServerError

logger = logging.getLogger("ray.serve")


class ApiKeysError(ServerError):
    """The configured key source cannot be read or holds no key."""


@dataclass(frozen=True)
class ApiKey:
    tenant: str
    digest: bytes  # sha256 of the key: what is compared (equal lengths, constant time)


def parse_keys(text: str, source: str) -> list[ApiKey]:
    """Keys of a keys file (`KEY` or `TENANT KEY` per line, `#` comments) or of a variable's value (keys
    separated by commas or newlines, no tenants). A key without a tenant is a tenant of its own."""
    keys = []
    for number, raw in enumerate(text.replace(",", "\n").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) > 2:
            raise ApiKeysError(f"{source}: line {number} must be `KEY` or `TENANT KEY`, got {len(fields)} fields")
        key = fields[-1]
        digest = hashlib.sha256(key.encode()).digest()
        tenant = fields[0] if len(fields) == 2 else "key-" + digest.hex()[:12]
        keys.append(ApiKey(tenant, digest))
    return keys


class ApiKeys:
    """The authenticator of a gateway replica: `check(credential)` returns the caller's tenant or raises
    AuthenticationError. Thread-safe; the file is looked at no more than every `reload_period_s`."""

    def __init__(self, file: str | None, env: str | None, reload_period_s: float = 2.0):
        if file is None and env is None:
            raise ValueError("ApiKeys needs a keys file or an environment variable")
        self._file = Path(file) if file is not None else None
        self._env = env
        self._reload_period_s = reload_period_s
        self._lock = threading.Lock()
        self._file_stamp: tuple[int, int] | None = None
        self._file_keys: list[ApiKey] = []
        self._env_keys: list[ApiKey] = []
        self._checked_at = 0.0
        if env is not None:
            value = os.environ.get(env)
            if value is None:
                raise ApiKeysError(f"auth.api_keys_env names {env!r}, which is not set in the gateway's environment")
            self._env_keys = parse_keys(value, f"${env}")
        self._reload(force=True)
        if not self._file_keys and not self._env_keys:
            raise ApiKeysError("auth: the configured key sources hold no key; every request would be refused")

    def check(self, credential: str | None) -> str:
        """The tenant of the credential (an API key).

        Raises:
            AuthenticationError: no key given, or not a current key.
        """
        if not credential:
            raise AuthenticationError("an API key is required: send `Authorization: Bearer KEY`")
        self._reload()
        digest = hashlib.sha256(credential.encode()).digest()
        tenant = None
        for key in self._file_keys + self._env_keys:  # every key compared: no early exit to time
            if hmac.compare_digest(digest, key.digest) and tenant is None:
                tenant = key.tenant
        if tenant is None:
            raise AuthenticationError("the API key is not valid (revoked, mistyped or for another server)")
        return tenant

    def _reload(self, force: bool = False) -> None:
        if self._file is None:
            return
        now = time.monotonic()
        if not force and now - self._checked_at < self._reload_period_s:
            return
        with self._lock:
            self._checked_at = now
            try:
                stat = self._file.stat()
                stamp = (stat.st_mtime_ns, stat.st_size)
                if stamp == self._file_stamp:
                    return
                keys = parse_keys(self._file.read_text(), str(self._file))
            except (OSError, ApiKeysError) as e:
                if force:
                    raise ApiKeysError(f"auth.api_keys_file: cannot read {self._file} ({e})") from None
                logger.error("auth: keeping the previous keys, the keys file is unreadable: %s", e)
                return
            if self._file_stamp is not None:
                logger.info("auth: reloaded %d keys from %s", len(keys), self._file)
            self._file_keys, self._file_stamp = keys, stamp
