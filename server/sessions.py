"""Sessions on top of a store: the model's state blob, the chat messages it consumed, owners and leases.

A store record is `MAGIC | u32 length | JSON sidecar | state blob`. The state blob is exactly the model's
fixed-size `SessionState` safetensors blob (what export returns and import takes); the sidecar is the
session's `ChatHistory` (server/chat.py): the chat messages it consumed (its own replies included), so
that a client re-sending the whole history is recognised and the chat template can render the whole
conversation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import secrets
import struct
import time
from dataclasses import dataclass

import torch

from model.hybrid import HybridLM
from model.session import consolidate_all, new_state
from model.state import SessionState, SessionStateError
from scheduler.redis_state import RECORD_MAGIC
from server.chat import ChatHistory
from server.errors import APIError, bad_request, session_not_found, state_refused
from server.metrics import Metrics
from server.schemas import HeadStats, LayerStats, SessionInfo
from server.stores import SessionStore, StoredSession, StoreError, VersionConflict

log = logging.getLogger("sleepserve.sessions")

MAGIC = RECORD_MAGIC
_ID = re.compile(r"[0-9a-f]{32}")


def new_session_id() -> str:
    """A random 128-bit id, as 32 hex characters."""
    return secrets.token_hex(16)


def check_session_id(session_id: str) -> str:
    """A client-given id, lower-cased; 400 unless it is 32 hex characters."""
    if not _ID.fullmatch(session_id.lower()):
        raise bad_request("session_id must be 32 hexadecimal characters (a random 128-bit id)", "session_id")
    return session_id.lower()


def pack_record(blob: bytes, chat: ChatHistory) -> bytes:
    sidecar = json.dumps(chat.to_json(), ensure_ascii=False, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(sidecar)) + sidecar + blob


def unpack_record(record: bytes) -> tuple[bytes, ChatHistory]:
    if not record.startswith(MAGIC):
        raise SessionStateError("format", "stored session record is not a sleepserve record")
    (size,) = struct.unpack("<I", record[4:8])
    return record[8 + size :], ChatHistory.from_json(json.loads(record[8 : 8 + size]))


@dataclass
class Checkout:
    """A session leased to one request: its state is the request's to change, then to commit."""

    id: str
    holder: str
    state: SessionState
    chat: ChatHistory
    version: int
    owner: str | None
    renewer: asyncio.Task | None = None  # keeps the lease alive while the request runs
    released: bool = False


def fast_weight_stats(fast_weights: list[torch.Tensor], top: int = 5) -> list[LayerStats]:
    """Per gdn layer and head: Frobenius norm, effective rank and the largest singular values."""
    layers = []
    for index, memory in enumerate(fast_weights):
        singular = torch.linalg.svdvals(memory.float())  # [H, min(K, V)]
        heads = []
        for s in singular:
            p = s / s.sum() if float(s.sum()) > 0 else s
            entropy = -float((p[p > 0] * p[p > 0].log()).sum())
            heads.append(
                HeadStats(
                    frobenius_norm=float(s.square().sum().sqrt()),
                    effective_rank=math.exp(entropy) if float(s.sum()) > 0 else 0.0,
                    top_singular_values=[float(v) for v in s[:top]],
                )
            )
        layers.append(
            LayerStats(
                layer=index,
                frobenius_norm=float(memory.float().norm()),
                effective_rank_mean=sum(h.effective_rank for h in heads) / len(heads),
                heads=heads,
            )
        )
    return layers


class SessionManager:
    """Load, lease, save, copy and inspect sessions of one model in one store."""

    def __init__(
        self,
        store: SessionStore,
        model: HybridLM,
        fingerprint: str,
        *,
        metrics: Metrics,
        passes: int,
        lease_ttl: float,
        lease_wait: float,
    ) -> None:
        self.store, self.model, self.fingerprint = store, model, fingerprint
        self.metrics, self.passes = metrics, passes
        self.lease_ttl, self.lease_wait = lease_ttl, lease_wait
        self.replica = secrets.token_hex(4)

    # -- records ------------------------------------------------------------------------------------

    def encode(self, state: SessionState, chat: ChatHistory) -> bytes:
        return pack_record(state.to_bytes(self.fingerprint, self.model.config.window_capacity), chat)

    def decode(self, record: bytes) -> tuple[SessionState, ChatHistory]:
        try:
            blob, chat = unpack_record(record)
            return SessionState.from_bytes(blob, self.fingerprint, self.model.config.schedule), chat
        except SessionStateError as exc:
            raise state_refused(exc) from exc

    async def _get(self, session_id: str, owner: str | None) -> StoredSession:
        stored = await self.store.get(session_id)
        if stored is None or (owner is not None and stored.owner != owner):
            raise session_not_found(session_id)  # another key's session does not exist for this one
        return stored

    async def _create(
        self, session_id: str, state: SessionState, chat: ChatHistory, owner: str | None
    ) -> None:
        try:
            await self.store.put(session_id, self.encode(state, chat), None, owner)
        except VersionConflict as exc:
            raise APIError(
                409, f"session {session_id} already exists", param="session_id", code="session_exists"
            ) from exc

    # -- operations ---------------------------------------------------------------------------------

    async def create(self, owner: str | None, session_id: str | None = None) -> str:
        session_id = check_session_id(session_id) if session_id else new_session_id()
        await self._create(session_id, new_state(self.model), ChatHistory(), owner)
        return session_id

    async def read(
        self, session_id: str, owner: str | None
    ) -> tuple[StoredSession, SessionState, ChatHistory]:
        stored = await self._get(session_id, owner)
        return (stored, *self.decode(stored.blob))

    async def checkout(self, session_id: str, owner: str | None) -> Checkout:
        """Lease the session (waiting up to `lease_wait` while another request has it: else 409) and
        load its latest state."""
        await self._get(session_id, owner)
        holder = f"{self.replica}:{secrets.token_hex(8)}"
        deadline = time.monotonic() + self.lease_wait
        while not await self.store.acquire_lease(session_id, holder, self.lease_ttl):
            if time.monotonic() > deadline:
                raise APIError(
                    409,
                    f"session {session_id} is busy with another request",
                    param="session_id",
                    code="session_busy",
                )
            await asyncio.sleep(0.05)
        try:
            stored, state, chat = await self.read(session_id, owner)
        except BaseException:
            await self.store.release_lease(session_id, holder)
            raise
        checkout = Checkout(session_id, holder, state, chat, stored.version, owner)
        checkout.renewer = asyncio.create_task(self._renew(checkout))
        return checkout

    async def _renew(self, checkout: Checkout) -> None:
        """Renew the lease every third of its TTL, so that a crashed replica's lease soon expires."""
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            try:
                if not await self.store.acquire_lease(checkout.id, checkout.holder, self.lease_ttl):
                    log.warning(
                        "lost the lease of session %s (its save will be compare-and-set)", checkout.id
                    )
            except StoreError as exc:
                log.warning("renewing the lease of session %s failed: %s", checkout.id, exc)

    async def commit(self, checkout: Checkout) -> None:
        """Save the checked-out state (compare-and-set on its version) and release the lease."""
        try:
            checkout.version = await self.store.put(
                checkout.id, self.encode(checkout.state, checkout.chat), checkout.version
            )
        finally:
            await self.release(checkout)

    async def release(self, checkout: Checkout) -> None:
        if not checkout.released:
            checkout.released = True
            if checkout.renewer is not None:
                checkout.renewer.cancel()
            await self.store.release_lease(checkout.id, checkout.holder)

    async def delete(self, session_id: str, owner: str | None) -> None:
        await self._get(session_id, owner)
        await self.store.delete(session_id)

    async def fork(self, session_id: str, owner: str | None) -> str:
        _, state, chat = await self.read(session_id, owner)
        fork_id = new_session_id()
        await self._create(fork_id, state, chat, owner)
        return fork_id

    async def export(self, session_id: str, owner: str | None) -> bytes:
        stored = await self._get(session_id, owner)
        self.decode(stored.blob)  # refuse to export a record this model cannot use
        return unpack_record(stored.blob)[0]

    async def import_blob(self, blob: bytes, owner: str | None) -> str:
        try:
            state = SessionState.from_bytes(blob, self.fingerprint, self.model.config.schedule)
        except SessionStateError as exc:
            raise state_refused(exc) from exc
        session_id = new_session_id()
        await self._create(session_id, state, ChatHistory(), owner)
        return session_id

    async def consolidate(
        self,
        session_id: str,
        owner: str | None,
        trigger: str = "explicit",
        passes: int | None = None,
        version: int | None = None,
    ) -> None:
        """Sleep on the whole unconsolidated tail now (checkpoints trained with variable chunks only),
        with `passes` (default: the server's N). With `version`, only a session still at that version."""
        if not self.model.config.variable_chunks:
            raise APIError(
                409,
                "this checkpoint was not trained with variable chunk lengths, so it can only consolidate "
                "full windows",
                code="consolidation_unsupported",
            )
        checkout = await self.checkout(session_id, owner)
        try:
            if version is not None and checkout.version != version:
                raise APIError(409, f"session {session_id} moved on", code="session_conflict")
            reports = await asyncio.to_thread(self._consolidate_all, checkout.state, passes or self.passes)
        except BaseException:
            await self.release(checkout)
            raise
        for report in reports:
            self.metrics.sleep_duration.labels(trigger=trigger).observe(report.seconds)
            self.metrics.sleep_passes.observe(report.passes)
            self.metrics.sleep_tokens.inc(report.tokens)
        await self.commit(checkout)

    def _consolidate_all(self, state: SessionState, passes: int) -> list:
        with torch.inference_mode():
            return consolidate_all(self.model, state, passes)

    def info(self, session_id: str, version: int, state: SessionState, chat: ChatHistory) -> SessionInfo:
        capacity = self.model.config.window_capacity
        return SessionInfo(
            id=session_id,
            version=version,
            schedule=state.schedule,
            tokens_seen=state.tokens_seen,
            chunks_consolidated=state.chunks_consolidated,
            consolidated_tokens=state.consolidated_tokens,
            sleep_passes=state.sleep_passes,
            last_passes=state.last_passes,
            sleep_seconds=state.sleep_seconds,
            tail_tokens=len(state.tail),
            window_capacity=capacity,
            window_fill=len(state.tail) / capacity,
            chat_messages=len(chat.messages),
            state_bytes=len(state.to_bytes(self.fingerprint, capacity)),
            fast_weights=fast_weight_stats(state.memory[: self.model.config.n_gdn]),  # not the conv state
        )
