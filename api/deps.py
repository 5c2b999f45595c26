"""What routes declare they need: the service context and an authenticated scope."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from embcompat.errors import Forbidden, Unauthorized
from embcompat.service.context import Context

bearer = HTTPBearer(auto_error=False, description="a token from EMBCOMPAT_API_TOKENS")


def get_context(request: Request) -> Context:
    return request.app.state.context  # type: ignore[no-any-return]


def _scopes(request: Request, creds: HTTPAuthorizationCredentials | None) -> list[str]:
    if creds is None or not creds.credentials:
        raise Unauthorized("missing bearer token", hint="send Authorization: Bearer <token>")
    scopes = get_context(request).settings.token_scopes(creds.credentials)
    if not scopes:
        raise Unauthorized("unknown bearer token")
    return list(scopes)


def require_read(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    scopes = _scopes(request, creds)
    if "read" not in scopes and "admin" not in scopes:
        raise Forbidden("this token has no 'read' scope")


def require_admin(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    if "admin" not in _scopes(request, creds):
        raise Forbidden("this operation changes state and needs the 'admin' scope")


Ctx = Annotated[Context, Depends(get_context)]
Read = Depends(require_read)
Admin = Depends(require_admin)
