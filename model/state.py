"""SessionState: all a session keeps between requests, and its fixed-size safetensors blob.

The blob holds the consolidated fast weights (one tensor per gdn layer), the unconsolidated tail
tokens padded to the window capacity, and the counters — all as tensors, so its size depends on the
model alone, never on how long the conversation ran. Its header names the format version, the
model's fingerprint and a SHA-256 checksum of everything else, and, when the writer has a signing key,
an HMAC of that checksum. A blob is untrusted input (clients import them): `from_bytes` checks every
tensor, token id and counter against the model it will run on (`StateSpec`) before anything uses it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

if TYPE_CHECKING:
    from model.hybrid import HybridLM

FORMAT_NAME = "sleepserve-session"
FORMAT_VERSION = 1
_COUNTERS = ("tokens_seen", "chunks_consolidated", "consolidated_tokens", "sleep_passes", "last_passes")
_PAD = -1  # tail padding up to the window capacity


class SessionStateError(ValueError):
    """A session blob that cannot be used with this model. `reason` is one of: format, version,
    fingerprint, schedule, checksum, signature, invalid (well-formed but not a state of this model)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class StateSpec:
    """What a state must look like to run on one model: its memory tensors (shape and dtype, from the
    model's own `empty_memory`), its vocabulary, chunk length, window capacity and schedule."""

    memory: tuple[tuple[tuple[int, ...], torch.dtype], ...]
    vocab_size: int
    window: int
    capacity: int
    schedule: str

    @classmethod
    def of(cls, model: HybridLM) -> StateSpec:
        c = model.config
        memory = tuple((tuple(m.shape[1:]), m.dtype) for m in model.empty_memory(1))
        return cls(memory, c.vocab_size, c.window, c.window_capacity, c.schedule)


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

    def to_bytes(self, fingerprint: str, capacity: int, signing_key: bytes | None = None) -> bytes:
        """Serialise to a blob whose size is fixed by the model; `capacity` is the window capacity.
        With `signing_key` the header carries an HMAC that `from_bytes` can demand."""
        if len(self.tail) > capacity:
            raise ValueError(f"tail of {len(self.tail)} tokens exceeds the window capacity {capacity}")
        tail = torch.full((capacity,), _PAD, dtype=torch.int32)
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
        if signing_key is not None:
            header["signature"] = _signature(signing_key, header["checksum"])
        return save_tensors(tensors, metadata=header)

    @classmethod
    def from_bytes(
        cls,
        blob: bytes,
        fingerprint: str,
        schedule: str | None = None,
        *,
        spec: StateSpec | None = None,
        signing_key: bytes | None = None,
    ) -> SessionState:
        """Parse and verify a blob for the model with `fingerprint` (and, if given, this schedule).
        With `spec` every tensor, token id and counter is checked against that model; with
        `signing_key` the blob must carry a valid HMAC made with it."""
        if spec is not None:
            schedule = schedule or spec.schedule
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
        claimed, signature = header.pop("checksum", None), header.pop("signature", None)
        if claimed != _checksum(tensors, header):
            raise SessionStateError("checksum", "session blob checksum does not match its contents")
        if signing_key is not None and not (
            isinstance(signature, str) and hmac.compare_digest(signature, _signature(signing_key, claimed))
        ):
            raise SessionStateError(
                "signature", "session blob is not signed by this server (missing or invalid signature)"
            )
        state = _unpack(tensors, header["schedule"])
        if spec is not None:
            state.check(spec)
        return state

    def check(self, spec: StateSpec) -> None:
        """Refuse (SessionStateError "invalid") a state that the model of `spec` cannot run: memory of
        another layout or not finite, tokens outside the vocabulary, counters that contradict the
        schedule or each other."""
        if len(self.memory) != len(spec.memory):
            _invalid(f"{len(self.memory)} memory tensors, the model has {len(spec.memory)} gdn layers")
        for i, (memory, (shape, dtype)) in enumerate(zip(self.memory, spec.memory, strict=True)):
            if tuple(memory.shape) != shape:
                _invalid(f"memory.{i} has shape {list(memory.shape)}, the model's is {list(shape)}")
            if not bool(torch.isfinite(memory).all()):
                _invalid(f"memory.{i} holds non-finite values")
            self.memory[i] = memory.to(dtype)
        if len(self.tail) > spec.capacity:
            _invalid(f"{len(self.tail)} tail tokens exceed the window capacity {spec.capacity}")
        if any(not 0 <= t < spec.vocab_size for t in self.tail):
            _invalid(f"tail token ids must lie in [0, {spec.vocab_size})")
        if spec.schedule == "hard" and self.prev_len:
            _invalid("prev_len must be 0 in the hard schedule")
        if self.prev_len > spec.capacity - spec.window:
            _invalid(
                f"prev_len {self.prev_len} exceeds the previous chunk's room {spec.capacity - spec.window}"
            )
        if len(self.tail) - self.prev_len >= spec.window:
            _invalid(
                f"the current chunk holds {len(self.tail) - self.prev_len} tokens: a full chunk is never stored"
            )
        if self.consolidated_tokens > self.chunks_consolidated * spec.window:
            _invalid("consolidated_tokens exceeds chunks_consolidated × window")


def _unpack(tensors: dict[str, Tensor], schedule: str) -> SessionState:
    """The state in a checksummed blob's tensors, after the checks that need no model: the names, dtypes
    and shapes of the format, and counters that are non-negative and consistent."""
    n_memory = sum(name.startswith("memory.") for name in tensors)
    expected = {*(f"memory.{i}" for i in range(n_memory)), "tail", "counters", "sleep_seconds"}
    if set(tensors) != expected:
        names = sorted(set(tensors) ^ expected)
        _invalid(f"unexpected or missing tensors: {', '.join(names)}")
    layout = {"tail": (torch.int32, 1), "counters": (torch.int64, 1), "sleep_seconds": (torch.float64, 1)}
    layout |= {f"memory.{i}": (torch.float32, None) for i in range(n_memory)}  # shapes: the model's
    for name, (dtype, ndim) in layout.items():
        tensor = tensors[name]
        if tensor.dtype != dtype or (ndim is not None and tensor.dim() != ndim):
            shape = f"{ndim}-d " if ndim else ""
            _invalid(f"{name} must be a {shape}{dtype} tensor, got a {tensor.dim()}-d {tensor.dtype} one")
    counters, tail = tensors["counters"].tolist(), tensors["tail"]
    if len(counters) != len(_COUNTERS) + 2:
        _invalid(f"counters must hold {len(_COUNTERS) + 2} values, got {len(counters)}")
    named = dict(zip((*_COUNTERS, "prev_len", "tail_len"), counters, strict=True))
    if negative := [name for name, value in named.items() if value < 0]:
        _invalid(f"negative counters: {', '.join(negative)}")
    sleep_seconds = float(tensors["sleep_seconds"][0]) if tensors["sleep_seconds"].numel() == 1 else -1.0
    if not (math.isfinite(sleep_seconds) and sleep_seconds >= 0):
        _invalid("sleep_seconds must be one finite, non-negative value")
    tail_len, prev_len = named.pop("tail_len"), named.pop("prev_len")
    if tail_len > tail.numel():
        _invalid(f"tail_len {tail_len} exceeds the tail's {tail.numel()} slots")
    if bool((tail[tail_len:] != _PAD).any()):
        _invalid("tail padding holds tokens past tail_len")
    if prev_len > tail_len:
        _invalid(f"prev_len {prev_len} exceeds tail_len {tail_len}")
    if named["tokens_seen"] != named["consolidated_tokens"] + tail_len:
        _invalid("tokens_seen must equal consolidated_tokens + tail_len")
    if named["chunks_consolidated"] > named["consolidated_tokens"]:
        _invalid("chunks_consolidated exceeds consolidated_tokens (a chunk holds at least one token)")
    if (
        not named["chunks_consolidated"] <= named["sleep_passes"]
        or named["last_passes"] > named["sleep_passes"]
    ):
        _invalid("sleep_passes must count at least one pass per chunk and include last_passes")
    if (named["chunks_consolidated"] == 0) != (named["last_passes"] == 0):
        _invalid("last_passes must be 0 exactly when no chunk was consolidated")
    return SessionState(
        memory=[tensors[f"memory.{i}"] for i in range(n_memory)],
        schedule=schedule,
        tail=tail[:tail_len].tolist(),
        prev_len=prev_len,
        sleep_seconds=sleep_seconds,
        **named,
    )


def _invalid(message: str) -> None:
    raise SessionStateError("invalid", f"session blob is not a valid state: {message}")


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
        digest.update(tensors[name].reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _signature(key: bytes, checksum: str) -> str:
    """HMAC-SHA256 of the checksum, which covers the header and every tensor byte."""
    return hmac.new(key, checksum.encode(), hashlib.sha256).hexdigest()
