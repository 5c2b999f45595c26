"""What routes declare they need: the service context and an authenticated scope.

`api.guard` checks the token and the scope before the body is read; these dependencies
say which scope a route needs (the guard reads them) and document it in OpenAPI."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from embcompat.errors import Forbidden, Unauthorized
from embcompat.service.context import Context
from embcompat.settings import Principal

bearer = HTTPBearer(auto_error=False, description="a token from EMBCOMPAT_API_TOKENS")


def get_context(request: Request) -> Context:
    return request.app.state.context  # type: ignore[no-any-return]


def principal(request: Request) -> Principal:
    """Who sent the request, as the guard authenticated it."""
    found = getattr(request.state, "principal", None)
    if not isinstance(found, Principal):
        raise Unauthorized("missing bearer token", hint="send Authorization: Bearer <token>")
    return found


def require_read(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    if not {"read", "admin"} & set(principal(request).scopes):
        raise Forbidden("this token has no 'read' scope")


def require_admin(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    if "admin" not in principal(request).scopes:
        raise Forbidden("this operation changes state and needs the 'admin' scope")


def audit(request: Request, **counts: int | str) -> None:
    """Add what an admin action did (counts, ids) to its audit row."""
    request.state.audit = {**getattr(request.state, "audit", {}), **counts}


Ctx = Annotated[Context, Depends(get_context)]
Read = Depends(require_read)
Admin = Depends(require_admin)
