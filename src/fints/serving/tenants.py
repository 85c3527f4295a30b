"""API keys and the tenant namespaces they open.

Keys come from a JSON file or the ``FINTS_API_KEYS`` environment variable, both
``{"key": "tenant"}``. A key sees only its tenant: the same user name under two
tenants is two unrelated users. Without keys the server is single-tenant
(``default``), unauthenticated, and only ever bound to loopback.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
from collections.abc import Mapping
from pathlib import Path

from fints.errors import FintsError, InvalidInputError
from fints.serving.api_errors import ApiError
from fints.store import DEFAULT_TENANT, check_name

KEYS_ENV = "FINTS_API_KEYS"
MIN_KEY_CHARS = 8


def parse_api_keys(text: str, source: str) -> dict[str, str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FintsError(f"{source}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict) or not data:
        raise FintsError(f'{source}: expected a non-empty JSON object {{"key": "tenant", ...}}')
    keys: dict[str, str] = {}
    for key, tenant in data.items():
        if not isinstance(tenant, str):
            raise FintsError(f"{source}: the tenant of a key must be a string, got {tenant!r}")
        if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
            raise FintsError(
                f"{source}: API keys need at least {MIN_KEY_CHARS} characters and no spaces "
                f"(key for tenant {tenant!r})"
            )
        try:
            keys[key] = check_name("tenant", tenant)
        except InvalidInputError as exc:
            raise FintsError(f"{source}: {exc}") from None
    return keys


def load_api_keys(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, str] | None:
    """Keys from ``path`` if given, else from ``$FINTS_API_KEYS``; None when neither is set."""
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FintsError(f"API keys file {str(file)!r} does not exist")
        return parse_api_keys(file.read_text(encoding="utf-8"), str(file))
    env = os.environ if environ is None else environ
    if env.get(KEYS_ENV):
        return parse_api_keys(env[KEYS_ENV], f"${KEYS_ENV}")
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, keys: Mapping[str, str] | None) -> None:
    """Refuse to serve without authentication on anything but loopback."""
    if keys is None and not is_loopback(host):
        raise FintsError(
            f"refusing to listen on {host!r} without API keys: without --api-keys (or "
            f"${KEYS_ENV}) the server has no authentication and binds to loopback only"
        )


class TenantResolver:
    """Maps the ``Authorization: Bearer <key>`` header of a request to its tenant."""

    def __init__(self, keys: Mapping[str, str] | None) -> None:
        self._keys = dict(keys) if keys is not None else None

    @property
    def single_tenant(self) -> bool:
        return self._keys is None

    @property
    def tenants(self) -> list[str]:
        return sorted(set(self._keys.values())) if self._keys else [DEFAULT_TENANT]

    def resolve(self, authorization: str | None, requested_tenant: str | None = None) -> str:
        tenant = self._tenant_of(authorization)
        if requested_tenant is not None and requested_tenant != tenant:
            raise ApiError(
                403,
                f"this API key belongs to another tenant; it cannot act on tenant "
                f"{requested_tenant!r}",
                type="permission_error",
                code="tenant_forbidden",
            )
        return tenant

    def _tenant_of(self, authorization: str | None) -> str:
        if self._keys is None:
            return DEFAULT_TENANT
        if not authorization:
            raise _unauthorized("no API key: send 'Authorization: Bearer <key>'", "missing_api_key")
        scheme, _, key = authorization.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise _unauthorized(
                "malformed Authorization header: expected 'Bearer <key>'", "invalid_api_key"
            )
        found = None
        for known, tenant in self._keys.items():  # compare every key, in constant time each
            if hmac.compare_digest(known.encode(), key.encode()):
                found = tenant
        if found is None:
            raise _unauthorized("invalid API key", "invalid_api_key")
        return found


def _unauthorized(message: str, code: str) -> ApiError:
    return ApiError(
        401,
        message,
        type="authentication_error",
        code=code,
        headers={"www-authenticate": "Bearer"},
    )
