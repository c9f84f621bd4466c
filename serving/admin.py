"""Admin endpoints, behind a bearer token from ``EMAREC_ADMIN_TOKEN``.

Without a configured token they are disabled (403 saying how to enable them);
a missing or wrong token gets 401. Tokens are compared in constant time.
"""

from __future__ import annotations

import logging
import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from serving.middleware import stamp_model_version
from serving.schemas import ReloadErrorInfo, ReloadResponse
from serving.state import State
from serving.watcher import ReloadError

logger = logging.getLogger(__name__)

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="AdminToken",
    description="The value of EMAREC_ADMIN_TOKEN, as `Authorization: Bearer <token>`.",
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def require_admin(request: Request, state: State, credentials: Credentials):
    """Let the request through only with the configured admin token.

    Raises:
        HTTPException: 403 while no token is configured, 401 for a missing or
            wrong one.
    """
    token = state.settings.admin_token
    if token is None:
        raise HTTPException(
            403,
            "admin endpoints are disabled; set EMAREC_ADMIN_TOKEN to a secret of "
            "at least 16 characters and restart the server to enable them",
        )
    sent = b"" if credentials is None else credentials.credentials.encode()
    # Bytes, not str: compare_digest refuses non-ASCII str, which a client sends.
    if not secrets.compare_digest(sent, token.get_secret_value().encode()):
        client = request.client.host if request.client else "unknown"
        logger.warning("admin request with a missing or wrong token from %s", client)
        raise HTTPException(
            401,
            "missing or wrong admin token; send `Authorization: Bearer <token>` "
            "with the server's EMAREC_ADMIN_TOKEN",
            headers={"WWW-Authenticate": "Bearer"},
        )


router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses={
        401: {"description": "Missing or wrong admin token."},
        403: {"description": "Admin endpoints are disabled (no token configured)."},
    },
)


@router.post("/reload", response_model=ReloadResponse)
def reload(request: Request, state: State) -> ReloadResponse:
    """Check the registry alias now and serve its version if it is new.

    A version that fails to load leaves the current one serving; the answer
    is still 200, with ``error`` set (``/healthz`` shows it too).
    """
    outcome = state.watcher.check()
    stamp_model_version(request, outcome.model_version)
    return ReloadResponse(
        model_version=outcome.model_version,
        previous_version=outcome.previous_version,
        changed=outcome.changed,
        error=error_info(outcome.error),
    )


def error_info(error: ReloadError | None) -> ReloadErrorInfo | None:
    """The response body's form of a reload error.

    Args:
        error: the watcher's error, if any.

    Returns:
        The same fields as a response model, or ``None``.
    """
    if error is None:
        return None
    return ReloadErrorInfo(
        model_version=error.model_version, message=error.message, at=error.at
    )
