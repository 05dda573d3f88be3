"""HTTP basic auth as AUTOMATIC1111's ``--api-auth user:pass[,user:pass...]``, mapped onto the suite's principals.

Each API user acts on the suite as a principal: the gRPC calls the gateway makes for that user carry the
user's suite token (``--user-tokens-file``, one ``USER TOKEN`` a line), whose principal (the orchestrator's
``--auth-tokens-file``) owns the user's jobs. Without ``--api-auth`` every caller is the anonymous user.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPBasic, HTTPBasicCredentials

#: Name of the user of a gateway without ``--api-auth``.
ANONYMOUS_NAME = "anonymous"


@dataclass(frozen=True)
class User:
    """Who called the REST API: ``name`` as in ``--api-auth`` and ``principal``, the suite identity its jobs carry
    (the token's principal; "anonymous" without auth)."""

    name: str
    principal: str

    @property
    def anonymous(self) -> bool:
        return self.name == ANONYMOUS_NAME


ANONYMOUS = User(ANONYMOUS_NAME, ANONYMOUS_NAME)


def parse_api_auth(value: str | None) -> dict[str, str]:
    """``user:pass[,user:pass...]`` -> {user: password}; ValueError saying what to fix."""
    users: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (value or "").split(","))):
        name, sep, password = item.partition(":")
        if not sep or not name or not password:
            raise ValueError("--api-auth takes user:password pairs separated by commas")
        if name in users:
            raise ValueError(f"--api-auth names the user {name[:40]!r} twice")
        users[name] = password
    return users


_basic = HTTPBasic(auto_error=False)


def check_password(users: dict[str, str], credentials: HTTPBasicCredentials | None) -> str | None:
    """The user name when the credentials match one of ``users`` (compared in constant time), else None."""
    if credentials is None:
        return None
    expected = users.get(credentials.username)
    # Compare against something even for an unknown user, so the timing does not tell which names exist.
    matched = hmac.compare_digest((expected or "\0").encode(), credentials.password.encode())
    return credentials.username if expected is not None and matched else None


async def current_user(request: Request, credentials: HTTPBasicCredentials | None = Depends(_basic)) -> User:
    """FastAPI dependency: the calling user (HTTP basic per ``--api-auth``; ANONYMOUS when it is not set).

    Answers 401 with ``WWW-Authenticate: Basic`` when the credentials are missing or wrong."""
    settings = request.app.state.settings
    if not settings.api_users:
        return ANONYMOUS
    name = check_password(settings.api_users, credentials)
    if name is None:
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})
    return User(name, settings.principals.get(name, name))
