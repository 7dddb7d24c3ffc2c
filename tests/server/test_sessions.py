"""The session manager's commit against a store that fails after the save."""

from __future__ import annotations

from support import tiny_model

from model.checkpoint import fingerprint
from server.metrics import Metrics
from server.sessions import SessionManager
from server.stores import MemoryStore, StoreUnavailable


class LeaseReleaseFails(MemoryStore):
    """Saves, then fails to release a lease, as Redis killed between the two does."""

    async def release_lease(self, session_id: str, holder: str) -> None:
        raise StoreUnavailable("the store went away after the save")


async def test_a_saved_turn_stands_when_its_lease_cannot_be_released() -> None:
    """The lease expires by itself: a commit whose save went through succeeds even if releasing the
    lease fails (reporting it failed told the client its turn was lost when it was stored: the soak's
    Redis restart left sessions holding one more turn than their clients were answered)."""
    model = tiny_model()
    manager = SessionManager(
        LeaseReleaseFails(session_ttl=60.0, max_bytes=1 << 20),
        model,
        fingerprint(model),
        metrics=Metrics(),
        passes=2,
        lease_ttl=5.0,
        lease_wait=0.0,
    )
    session = await manager.create(owner=None)
    checkout = await manager.checkout(session, None)
    checkout.state.tail += [65, 66, 67]
    checkout.state.tokens_seen += 3
    await manager.commit(checkout)
    stored, state, _ = await manager.read(session, None)
    assert (stored.version, state.tokens_seen, state.tail) == (2, 3, [65, 66, 67])
