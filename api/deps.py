"""What routes declare they need: the service context and an authenticated scope.

`api.guard` checks the token and the scope before the body is read; these dependencies
say which scope a route needs (the guard reads them) and document it in OpenAPI."""

from __future__ import annotations

import sys
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from embcompat.errors import Forbidden, Unauthorized
from embcompat.service.context import Context
from embcompat.settings import Principal, Settings

bearer = HTTPBearer(auto_error=False, description="a token from EMBCOMPAT_API_TOKENS")


def get_context(request: Request) -> Context:
    return request.app.state.context  # type: ignore[no-any-return]


def principal(request: Request) -> Principal:
    """Who sent the request, as the guard authenticated it."""
    found = getattr(request.state, "principal", None)
    if not isinstance(found, Principal):
        raise Unauthorized("missing bearer token", hint="send Authorization: Bearer <token>")
    return found


def check_scope(who: Principal, need: str) -> None:
    """Forbidden unless `who` holds `need` ('admin' covers 'read')."""
    if need == "admin" and "admin" not in who.scopes:
        raise Forbidden("this operation changes state and needs the 'admin' scope")
    if need == "read" and not {"read", "admin"} & set(who.scopes):
        raise Forbidden("this token has no 'read' scope")


def require_read(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    check_scope(principal(request), "read")


def require_admin(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    check_scope(principal(request), "admin")


def audit(request: Request, **counts: int | str) -> None:
    """Add what an admin action did (counts, ids) to its audit row."""
    request.state.audit = {**getattr(request.state, "audit", {}), **counts}


def scrubbed(problem: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """`problem` (any JSON answer) with server folders replaced by names: a message from
    deep inside (a library's, a file's, a job's error) must not tell a client where the
    service keeps its files."""
    folders = {str(settings.resolved_data_dir): "<data>", sys.prefix: "<python>"}
    folders.update({str(r): "<model-root>" for r in settings.resolved_model_roots})
    longest_first = sorted(folders.items(), key=lambda f: -len(f[0]))

    def scrub(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        if isinstance(value, str):
            for folder, name in longest_first:
                value = value.replace(folder, name)
        return value

    return scrub(problem)  # type: ignore[no-any-return]


Ctx = Annotated[Context, Depends(get_context)]
Read = Depends(require_read)
Admin = Depends(require_admin)
