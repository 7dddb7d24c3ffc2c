"""Sessions on top of a store: the model's state blob, the chat messages it consumed, owners and leases.

A store record is `MAGIC | u32 length | JSON sidecar | state blob`. The state blob is exactly the model's
fixed-size `SessionState` safetensors blob (what export returns and import takes); the sidecar lists
short hashes of the chat messages the session consumed (its own replies included), so that a client
re-sending the whole history is recognised and only its new messages are fed, and the conversation the
chat template renders (server/chat.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import secrets
import struct
import time
from dataclasses import dataclass, field

import torch

from model.hybrid import HybridLM
from model.session import consolidate_all, new_state
from model.state import SessionState, SessionStateError, StateSpec
from scheduler.redis_state import RECORD_MAGIC
from server.chat import EMPTY_DIGEST, Message
from server.errors import APIError, bad_request, session_damaged, session_not_found, state_refused
from server.metrics import Metrics
from server.schemas import SESSION_ID_MESSAGE, ChatMessage, HeadStats, LayerStats, SessionInfo, is_session_id
from server.stores import DamagedRecord, SessionStore, StoredSession, StoreError, VersionConflict

log = logging.getLogger("sleepserve.sessions")

MAGIC = RECORD_MAGIC


def new_session_id() -> str:
    """A random 128-bit id, as 32 hex characters."""
    return secrets.token_hex(16)


def check_session_id(session_id: str) -> str:
    """A client-given id, lower-cased; 400 unless it is 32 hex characters."""
    if not is_session_id(session_id):
        raise bad_request(SESSION_ID_MESSAGE, "session_id")
    return session_id.lower()


@dataclass
class ChatHistory:
    """The chat messages a session consumed, as short hashes, within a fixed bound: the first one and
    the last `keep`; those in between are only counted (`skipped`), so a re-sent history is checked at
    both ends. `last_reply`: the text of the session's last reply, of which a client whose stream
    dropped received only a prefix (the session consumed all of it)."""

    recent: list[str] = field(default_factory=list)
    first: str | None = None
    skipped: int = 0
    last_reply: str | None = None
    # For the chat template (server/chat.py): the conversation as (role, content), None once it has
    # outgrown the bound (the template then renders the new messages alone), and the count and digest
    # of the tokens the session consumed as its rendering.
    conversation: list[Message] | None = field(default_factory=list)
    tokens: int = 0
    digest: str = EMPTY_DIGEST

    def __len__(self) -> int:
        return self.skipped + len(self.recent)

    def add(self, hashes: list[str], keep: int, last_reply: str | None = None) -> None:
        if self.first is None and hashes:
            self.first = hashes[0]
        self.recent += hashes
        drop = max(0, len(self.recent) - keep)
        self.skipped += drop
        del self.recent[:drop]
        self.last_reply = last_reply

    def to_json(self) -> dict:
        return {
            "messages": self.recent,
            "first": self.first,
            "skipped": self.skipped,
            "reply": self.last_reply,
            "conversation": self.conversation,
            "tokens": self.tokens,
            "digest": self.digest,
        }

    @classmethod
    def from_json(cls, data: dict) -> ChatHistory:
        recent = list(data["messages"])
        if not all(isinstance(h, str) for h in recent):
            raise ValueError("message hashes must be strings")
        first = data.get("first", recent[0] if recent else None)
        conversation = data.get("conversation")  # absent (an older record): not known
        if conversation is not None:
            conversation = [(str(role), str(content)) for role, content in conversation]
        return cls(
            recent,
            first,
            int(data.get("skipped", 0)),
            data.get("reply"),
            conversation,
            int(data.get("tokens", 0)),
            str(data.get("digest", EMPTY_DIGEST)),
        )


def pack_record(blob: bytes, history: ChatHistory) -> bytes:
    sidecar = json.dumps(history.to_json(), separators=(",", ":"), ensure_ascii=False).encode()
    return MAGIC + struct.pack("<I", len(sidecar)) + sidecar + blob


def unpack_record(record: bytes) -> tuple[bytes, ChatHistory]:
    """The state blob and chat history of a store record (SessionStateError "format" when damaged)."""
    if not record.startswith(MAGIC) or len(record) < 8:
        raise SessionStateError("format", "stored session record is not a sleepserve record")
    (size,) = struct.unpack("<I", record[4:8])
    try:
        return record[8 + size :], ChatHistory.from_json(json.loads(record[8 : 8 + size]))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SessionStateError("format", f"stored session record has a damaged sidecar: {exc}") from exc


def message_hash(message: ChatMessage) -> str:
    payload = json.dumps([message.template_role(), message.text()], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def reply_hash(text: str) -> str:
    return message_hash(ChatMessage(role="assistant", content=text))


def new_chat_messages(messages: list[ChatMessage], history: ChatHistory) -> int:
    """Index of the first message the session has not consumed.

    Either the request re-sends the consumed history (and adds to it), or it holds only new messages.
    A request that starts like the history but departs from it contradicts the session: 409. The
    history's middle (`skipped`) is taken on trust; the session's last reply matches any prefix of
    it (what a client whose stream dropped received).
    """
    hashes = [message_hash(m) for m in messages]
    n, start = len(history), history.skipped
    if not n or hashes[0] != history.first:
        return 0

    def same(i: int) -> bool:
        if hashes[i] == history.recent[i - start]:
            return True
        reply = history.last_reply
        last = i == n - 1 and messages[i].role == "assistant"
        return last and reply is not None and reply.startswith(messages[i].text())

    known = range(start, min(n, len(hashes)))
    differ = next((i for i in known if not same(i)), None)
    if differ is None and len(hashes) > n:
        return n
    if differ is None:
        message = (
            f"messages re-send the {n} messages this session consumed but add no new one"
            if len(hashes) == n
            else f"messages re-send only {len(hashes)} of the {n} messages this session consumed"
        )
    else:
        message = (
            f"messages[{differ}] ({messages[differ].role}) differs from the message this session consumed at "
            f"that position: the history contradicts the session (send only the new messages, or the history "
            f"exactly as the session saw it, its replies included)"
        )
    raise APIError(409, message, param="messages", code="session_history_mismatch")


@dataclass
class Checkout:
    """A session leased to one request: its state is the request's to change, then to commit."""

    id: str
    holder: str
    state: SessionState
    history: ChatHistory
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
        history_limit: int = 1024,
        signing_key: bytes | None = None,
    ) -> None:
        """`history_limit`: chat message hashes a record keeps (`ChatHistory`); `signing_key`: sign
        exported blobs and refuse imports without a valid signature."""
        self.store, self.model, self.fingerprint = store, model, fingerprint
        self.metrics, self.passes = metrics, passes
        self.lease_ttl, self.lease_wait = lease_ttl, lease_wait
        self.history_limit, self.signing_key = history_limit, signing_key
        self.spec = StateSpec.of(model)
        self.replica = secrets.token_hex(4)

    # -- records ------------------------------------------------------------------------------------

    def encode(self, state: SessionState, history: ChatHistory) -> bytes:
        return pack_record(state.to_bytes(self.fingerprint, self.model.config.window_capacity), history)

    def decode(self, session_id: str, record: bytes) -> tuple[SessionState, ChatHistory]:
        """A stored record's state and history; 409 `session_damaged` when it cannot be used."""
        try:
            blob, history = unpack_record(record)
            return SessionState.from_bytes(blob, self.fingerprint, spec=self.spec), history
        except SessionStateError as exc:
            if exc.reason in ("fingerprint", "schedule", "version"):
                raise state_refused(exc) from exc
            raise session_damaged(session_id, str(exc)) from exc

    async def _get(self, session_id: str, owner: str | None) -> StoredSession:
        try:
            stored = await self.store.get(session_id)
        except DamagedRecord as exc:
            if owner is not None and exc.owner not in (owner, None):  # an unreadable owner: deletable
                raise session_not_found(session_id) from exc
            raise session_damaged(session_id, str(exc)) from exc
        if stored is None or (owner is not None and stored.owner != owner):
            raise session_not_found(session_id)  # another key's session does not exist for this one
        return stored

    async def _create(
        self, session_id: str, state: SessionState, history: ChatHistory, owner: str | None
    ) -> None:
        try:
            await self.store.put(session_id, self.encode(state, history), None, owner)
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
        return (stored, *self.decode(session_id, stored.blob))

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
            stored, state, history = await self.read(session_id, owner)
        except BaseException:
            await self.store.release_lease(session_id, holder)
            raise
        checkout = Checkout(session_id, holder, state, history, stored.version, owner)
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
        """Save the checked-out state (compare-and-set on its version) and release the lease. A lease
        that cannot be released expires by itself: the save stands (a commit reported failed after it
        told the client its turn was lost when it was stored)."""
        try:
            checkout.version = await self.store.put(
                checkout.id, self.encode(checkout.state, checkout.history), checkout.version
            )
        finally:
            try:
                await self.release(checkout)
            except StoreError as exc:
                log.warning("releasing the lease of session %s failed: %s", checkout.id, exc)

    async def release(self, checkout: Checkout) -> None:
        if not checkout.released:
            checkout.released = True
            if checkout.renewer is not None:
                checkout.renewer.cancel()
            await self.store.release_lease(checkout.id, checkout.holder)

    async def delete(self, session_id: str, owner: str | None) -> None:
        """Delete the session, damaged or not: its blob is never parsed."""
        try:
            await self._get(session_id, owner)
        except APIError as exc:
            if exc.code != "session_damaged":  # damaged: its owner was checked, it may go
                raise
        await self.store.delete(session_id)

    async def fork(self, session_id: str, owner: str | None) -> str:
        _, state, history = await self.read(session_id, owner)
        fork_id = new_session_id()
        await self._create(fork_id, state, history, owner)
        return fork_id

    async def export(self, session_id: str, owner: str | None) -> bytes:
        """The session's state blob, signed when the server has a signing key."""
        _, state, _ = await self.read(session_id, owner)  # refuses a record this model cannot use
        return state.to_bytes(self.fingerprint, self.model.config.window_capacity, self.signing_key)

    async def import_blob(self, blob: bytes, owner: str | None) -> str:
        """Store a blob under a new id once it has passed every check (nothing is stored before)."""
        try:
            state = SessionState.from_bytes(
                blob, self.fingerprint, spec=self.spec, signing_key=self.signing_key
            )
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

    def info(self, session_id: str, version: int, state: SessionState, history: ChatHistory) -> SessionInfo:
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
            chat_messages=len(history),
            state_bytes=len(state.to_bytes(self.fingerprint, capacity)),
            fast_weights=fast_weight_stats(state.memory[: self.model.config.n_gdn]),  # not the conv state
        )
