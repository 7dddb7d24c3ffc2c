"""The session routes: create, import, read, delete, consolidate, fork and export a session."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.context import Server
from server.routing import Owner, ServerDep, SessionPath
from server.schemas import CreateSessionRequest, DeletedSession, SessionInfo

router = APIRouter()


async def _info(server: Server, session_id: str, owner: str | None) -> SessionInfo:
    stored, state, history = await server.sessions.read(session_id, owner)
    return server.sessions.info(session_id, stored.version, state, history)


@router.post("/sessions", response_model=SessionInfo, tags=["sessions"])
async def create_session(
    server: ServerDep, owner: Owner, body: CreateSessionRequest | None = None
) -> SessionInfo:
    """Create an empty session (a random id, or a client-chosen one of 32 hex characters). 409: that
    id exists."""
    session_id = await server.sessions.create(owner, body.session_id if body else None)
    return await _info(server, session_id, owner)


@router.post(
    "/sessions/import",
    response_model=SessionInfo,
    tags=["sessions"],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def import_session(request: Request, server: ServerDep, owner: Owner) -> SessionInfo:
    """Store an exported session blob under a new id, once every check passed: 409 for a blob of
    another model, schedule or format version, 422 for a damaged, invalid or (with a signing key)
    unsigned one. Larger than `max_import_bytes`: 413, the upload cut there."""
    blob = await request.body()  # `BodyLimit` has bounded it
    session_id = await server.sessions.import_blob(blob, owner)
    return await _info(server, session_id, owner)


@router.get("/sessions/{session_id:session}", response_model=SessionInfo, tags=["sessions"])
async def get_session(session_id: SessionPath, server: ServerDep, owner: Owner) -> SessionInfo:
    """Counters, window fill, schedule, version, state size and fast-weight statistics."""
    return await _info(server, session_id, owner)


@router.delete("/sessions/{session_id:session}", response_model=DeletedSession, tags=["sessions"])
async def delete_session(session_id: SessionPath, server: ServerDep, owner: Owner) -> DeletedSession:
    await server.sessions.delete(session_id, owner)
    return DeletedSession(id=session_id)


@router.post("/sessions/{session_id:session}/consolidate", response_model=SessionInfo, tags=["sessions"])
async def consolidate_session(session_id: SessionPath, server: ServerDep, owner: Owner) -> SessionInfo:
    """Sleep on the session's unconsolidated tokens now (409 unless trained with variable chunks)."""
    await server.sessions.consolidate(session_id, owner)
    return await _info(server, session_id, owner)


@router.post("/sessions/{session_id:session}/fork", response_model=SessionInfo, tags=["sessions"])
async def fork_session(session_id: SessionPath, server: ServerDep, owner: Owner) -> SessionInfo:
    """Copy the session to a new id; the two continue independently."""
    fork_id = await server.sessions.fork(session_id, owner)
    return await _info(server, fork_id, owner)


@router.get(
    "/sessions/{session_id:session}/export",
    tags=["sessions"],
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "The session blob."}},
)
async def export_session(session_id: SessionPath, server: ServerDep, owner: Owner) -> Response:
    """The session's state as its fixed-size safetensors blob."""
    blob = await server.sessions.export(session_id, owner)
    disposition = f'attachment; filename="session-{session_id}.safetensors"'
    return Response(blob, media_type="application/octet-stream", headers={"Content-Disposition": disposition})
