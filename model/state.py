"""SessionState: all a session keeps between requests, and its fixed-size safetensors blob.

The blob holds the consolidated fast weights (one tensor per gdn layer), the unconsolidated tail
tokens padded to the window capacity, and the counters — all as tensors, so its size depends on the
model alone, never on how long the conversation ran. Its header names the format version, the
model's fingerprint and a SHA-256 checksum of everything else; a blob that does not match is refused.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

FORMAT_NAME = "sleepserve-session"
FORMAT_VERSION = 1
_COUNTERS = ("tokens_seen", "chunks_consolidated", "consolidated_tokens", "sleep_passes", "last_passes")


class SessionStateError(ValueError):
    """A session blob that cannot be used with this model. `reason` is one of: format, version,
    fingerprint, schedule, checksum."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class SessionState:
    memory: list[Tensor]  # consolidated fast weights M, one [H, K, V] float32 tensor per gdn layer
    schedule: str
    tail: list[int] = field(default_factory=list)  # tokens not yet consolidated into memory
    prev_len: int = 0  # lagged: the completed chunk at the head of `tail` that attention still sees
    tokens_seen: int = 0
    chunks_consolidated: int = 0
    consolidated_tokens: int = 0
    sleep_passes: int = 0  # passes run over all sleeps of this session
    last_passes: int = 0  # N of the most recent sleep
    sleep_seconds: float = 0.0

    def clone(self) -> SessionState:
        return SessionState(
            **{**self.__dict__, "memory": [m.clone() for m in self.memory], "tail": list(self.tail)}
        )

    def to_bytes(self, fingerprint: str, capacity: int) -> bytes:
        """Serialise to a blob whose size is fixed by the model; `capacity` is the window capacity."""
        if len(self.tail) > capacity:
            raise ValueError(f"tail of {len(self.tail)} tokens exceeds the window capacity {capacity}")
        tail = torch.full((capacity,), -1, dtype=torch.int32)
        tail[: len(self.tail)] = torch.tensor(self.tail, dtype=torch.int32)
        tensors = {
            f"memory.{i}": m.detach().to("cpu", torch.float32).contiguous() for i, m in enumerate(self.memory)
        }
        tensors["tail"] = tail
        tensors["counters"] = torch.tensor(
            [getattr(self, name) for name in _COUNTERS] + [self.prev_len, len(self.tail)], dtype=torch.int64
        )
        tensors["sleep_seconds"] = torch.tensor([self.sleep_seconds], dtype=torch.float64)
        header = {
            "format": FORMAT_NAME,
            "version": str(FORMAT_VERSION),
            "fingerprint": fingerprint,
            "schedule": self.schedule,
        }
        header["checksum"] = _checksum(tensors, header)
        return save_tensors(tensors, metadata=header)

    @classmethod
    def from_bytes(cls, blob: bytes, fingerprint: str, schedule: str | None = None) -> SessionState:
        """Parse and verify a blob for the model with `fingerprint` (and, if given, this schedule)."""
        header = read_header(blob)
        if header.get("format") != FORMAT_NAME:
            raise SessionStateError("format", "not a sleepserve session blob")
        if header.get("version") != str(FORMAT_VERSION):
            raise SessionStateError(
                "version", f"session format version {header.get('version')} is not {FORMAT_VERSION}"
            )
        if header.get("fingerprint") != fingerprint:
            raise SessionStateError(
                "fingerprint",
                f"session was written by model {str(header.get('fingerprint'))[:12]}…, "
                f"this server runs model {fingerprint[:12]}…",
            )
        if schedule is not None and header.get("schedule") != schedule:
            raise SessionStateError(
                "schedule", f"session uses the {header.get('schedule')!r} schedule, this server {schedule!r}"
            )
        try:
            tensors = load_tensors(blob)
        except Exception as exc:  # safetensors raises its own error types for damaged payloads
            raise SessionStateError("checksum", f"session blob is damaged: {exc}") from exc
        claimed = header.pop("checksum", None)
        if claimed != _checksum(tensors, header):
            raise SessionStateError("checksum", "session blob checksum does not match its contents")
        counters = tensors["counters"].tolist()
        prev_len, tail_len = counters[len(_COUNTERS) :]
        n_memory = sum(name.startswith("memory.") for name in tensors)
        return cls(
            memory=[tensors[f"memory.{i}"] for i in range(n_memory)],
            schedule=header["schedule"],
            tail=tensors["tail"][:tail_len].tolist(),
            prev_len=prev_len,
            sleep_seconds=float(tensors["sleep_seconds"][0]),
            **dict(zip(_COUNTERS, counters, strict=False)),
        )


def read_header(blob: bytes) -> dict[str, str]:
    """The metadata of a safetensors blob (its first 8 bytes give the JSON header's length)."""
    try:
        (size,) = struct.unpack("<Q", blob[:8])
        metadata = json.loads(blob[8 : 8 + size])["__metadata__"]
    except Exception as exc:
        raise SessionStateError("format", "not a sleepserve session blob (unreadable header)") from exc
    if not isinstance(metadata, dict):
        raise SessionStateError("format", "not a sleepserve session blob (no metadata)")
    return dict(metadata)


def _checksum(tensors: dict[str, Tensor], header: dict[str, str]) -> str:
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
