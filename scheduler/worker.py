"""`sleepserve worker` (`python -m scheduler.worker`): consolidates sessions parked in Redis.

It consumes jobs from a Redis Stream with a consumer group. For each job it takes the session's lease
(a session that a request is serving is left for later), loads the record, checks that its version is
the job's (else the session moved on: the job is dropped), runs `consolidate_all` (the whole
unconsolidated tail; the checkpoint must be trained with variable chunk lengths) and writes the new
record with a compare-and-set on the version (a conflict means the result is stale: it is discarded).
Only then is the entry acknowledged. Entries that another consumer left pending for longer than
`--claim-after` seconds (a dead worker) are claimed with XAUTOCLAIM and redone; since the write is one
atomic compare-and-set, a worker killed at any point loses no session and leaves none half-written.

Test hook: SLEEPSERVE_WORKER_PAUSE_SECONDS sleeps between consolidating and writing.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

import redis
import torch
from prometheus_client import CollectorRegistry, Counter, start_http_server

from model.checkpoint import DEFAULT_CHECKPOINT, fingerprint, load_checkpoint
from model.cli_help import DefaultsHelpFormatter
from model.hybrid import HybridLM
from model.session import consolidate_all
from model.state import SessionState, SessionStateError, StateSpec
from scheduler.metrics import ConsolidationMetrics
from scheduler.redis_state import RedisSessions, VersionConflict, split_record
from scheduler.remote import DEFAULT_GROUP, DEFAULT_STREAM, RemoteJob, parse_job

log = logging.getLogger("sleepserve.worker")


class WorkerMetrics(ConsolidationMetrics):
    """The worker's Prometheus metrics: the server's consolidation metrics, plus job outcomes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        super().__init__(self.registry)
        self.jobs = Counter(
            "sleepserve_worker_jobs",
            "Remote consolidation jobs by outcome.",
            ["outcome"],
            registry=self.registry,
        )


@dataclass
class WorkerOptions:
    stream: str = DEFAULT_STREAM
    group: str = DEFAULT_GROUP
    consumer: str = "worker"
    claim_after: float = 30.0  # seconds an entry stays pending before another consumer takes it
    passes: int | None = None  # N when the job names none (None: the checkpoint's)
    lease_ttl: float = 30.0
    max_deliveries: int = 5  # an entry delivered more often is dropped (acknowledged) as poison
    block_seconds: float = 1.0
    pause_seconds: float = 0.0  # test hook


class Worker:
    """Consumes consolidation jobs for one model from one stream."""

    def __init__(
        self,
        model: HybridLM,
        client: redis.Redis,
        sessions: RedisSessions,
        options: WorkerOptions,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        if not model.config.variable_chunks:
            raise ValueError(
                "this checkpoint was not trained with variable chunk lengths (config.variable_chunks is "
                "false), so it can only consolidate full windows: remote consolidation needs one that was"
            )
        self.model, self.client, self.sessions = model, client, sessions
        self.options, self.metrics = options, metrics
        self.fingerprint = fingerprint(model)
        self.outcomes: dict[str, int] = {}

    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) unless it exists."""
        try:
            self.client.xgroup_create(self.options.stream, self.options.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def poll(self) -> int:
        """Handle the entries claimed from dead consumers, else wait for new ones. Returns how many."""
        o = self.options
        _, claimed, *_ = self.client.xautoclaim(
            o.stream, o.group, o.consumer, min_idle_time=max(1, round(o.claim_after * 1000)), count=8
        )
        entries = [(entry_id, fields, True) for entry_id, fields in claimed]
        if not entries:
            block = max(1, round(o.block_seconds * 1000))
            for _, messages in self.client.xreadgroup(
                o.group, o.consumer, {o.stream: ">"}, count=1, block=block
            ):
                entries += [(entry_id, fields, False) for entry_id, fields in messages]
        for entry_id, fields, redelivered in entries:
            outcome = self.handle(entry_id, fields, redelivered)
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
            if self.metrics is not None:
                self.metrics.jobs.labels(outcome=outcome).inc()
        return len(entries)

    def run(self, stop: threading.Event) -> None:
        """Poll until `stop` is set; a Redis outage is waited out."""
        while not stop.is_set():
            try:
                self.ensure_group()
                while not stop.is_set():
                    self.poll()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("redis unavailable (%s); retrying in 1 s", exc)
                stop.wait(1.0)

    def handle(self, entry_id: bytes, fields: dict[bytes, bytes] | None, redelivered: bool) -> str:
        """Process one entry and return its outcome: done, stale, conflict, missing, empty, refused,
        malformed, dropped (acknowledged) or busy, error (left pending, redelivered later)."""
        o, eid = self.options, entry_id.decode()
        if fields is None:  # trimmed from the stream while pending
            return self._ack(entry_id, "malformed", f"entry {eid} has no fields")
        if redelivered and self._deliveries(entry_id) > o.max_deliveries:
            return self._ack(entry_id, "dropped", f"entry {eid} was delivered over {o.max_deliveries} times")
        try:
            job = parse_job(fields)
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            return self._ack(entry_id, "malformed", f"entry {eid} is not a job: {exc!r}")
        name = f"job {eid} session {job.session} v{job.version} ({job.trigger})"
        holder = f"worker:{o.consumer}:{secrets.token_hex(4)}"
        try:
            if not self.sessions.acquire_lease(job.session, holder, o.lease_ttl):
                log.info("%s: busy (a request holds the session), retried later", name)
                return "busy"
            try:
                return self._consolidate(entry_id, job, name)
            finally:
                self.sessions.release_lease(job.session, holder)
        except (redis.ConnectionError, redis.TimeoutError):
            raise
        except Exception:
            log.exception("%s: failed, left pending for redelivery", name)
            return "error"

    def _consolidate(self, entry_id: bytes, job: RemoteJob, name: str) -> str:
        stored = self.sessions.get(job.session)
        if stored is None:
            return self._ack(entry_id, "missing", f"{name}: the session no longer exists")
        if stored.version != job.version:
            return self._ack(entry_id, "stale", f"{name}: the session moved on to v{stored.version}")
        header, blob = split_record(stored.blob)
        try:
            state = SessionState.from_bytes(blob, self.fingerprint, spec=StateSpec.of(self.model))
        except SessionStateError as exc:
            return self._ack(entry_id, "refused", f"{name}: refused: {exc}", logging.ERROR)
        if not state.tail:
            return self._ack(entry_id, "empty", f"{name}: nothing to consolidate")
        passes = job.passes or self.options.passes or self.model.config.sleep_passes
        start = time.perf_counter()
        with torch.inference_mode():
            reports = consolidate_all(self.model, state, passes)
        seconds = time.perf_counter() - start
        if self.options.pause_seconds:
            time.sleep(self.options.pause_seconds)
        record = header + state.to_bytes(self.fingerprint, self.model.config.window_capacity)
        try:
            new_version = self.sessions.put(job.session, record, job.version)
        except VersionConflict:
            return self._ack(entry_id, "conflict", f"{name}: the session changed meanwhile, result discarded")
        if self.metrics is not None:
            for report in reports:
                self.metrics.sleep_duration.labels(trigger=job.trigger).observe(report.seconds)
                self.metrics.sleep_passes.observe(report.passes)
                self.metrics.sleep_tokens.inc(report.tokens)
        tokens = sum(r.tokens for r in reports)
        return self._ack(
            entry_id, "done", f"{name}: {tokens} tokens, N={passes}, {seconds:.3f} s -> v{new_version}"
        )

    def _deliveries(self, entry_id: bytes) -> int:
        pending = self.client.xpending_range(
            self.options.stream, self.options.group, min=entry_id, max=entry_id, count=1
        )
        return int(pending[0]["times_delivered"]) if pending else 0

    def _ack(self, entry_id: bytes, outcome: str, message: str, level: int = logging.INFO) -> str:
        self.client.xack(self.options.stream, self.options.group, entry_id)
        log.log(level, "%s [%s]", message, outcome)
        return outcome


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"SLEEPSERVE_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sleepserve worker",
        description="Consolidate sessions parked in Redis (remote sleep jobs). Defaults come from the "
        "server's SLEEPSERVE_* environment variables where it has one.",
        formatter_class=DefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--checkpoint", default=_env("CHECKPOINT", str(DEFAULT_CHECKPOINT)), help="checkpoint folder")
    add("--device", default=_env("DEVICE", "cpu"), help="torch device")
    add(
        "--schedule",
        default=_env("SCHEDULE"),
        help="hard | lagged, as the server (default: the checkpoint's)",
    )
    add("--store", default=_env("STORE"), help="redis://host:port/db (required; default: SLEEPSERVE_STORE)")
    add("--key-prefix", default="sleepserve:", help="the store's key prefix")
    add(
        "--session-ttl",
        type=float,
        default=float(_env("SESSION_TTL", str(7 * 24 * 3600))),
        help="idle TTL, s",
    )
    add(
        "--stream",
        default=_env("SLEEP_STREAM", DEFAULT_STREAM),
        help="job stream, as the server's sleep_stream",
    )
    add("--group", default=DEFAULT_GROUP, help="consumer group")
    add(
        "--consumer",
        default=f"{socket.gethostname()}-{os.getpid()}",
        help="consumer name (unique per worker)",
    )
    add("--claim-after", type=float, default=30.0, help="seconds before a dead consumer's job is claimed")
    add("--passes", type=int, default=None, help="N for jobs that name none (default: the checkpoint's)")
    add("--lease-ttl", type=float, default=30.0, help="seconds the session lease is held per job")
    add("--max-deliveries", type=int, default=5, help="deliveries after which a job is dropped")
    add("--metrics-port", type=int, default=int(_env("PORT", "8000")), help="/metrics port (0: off)")
    add("--log-level", default=_env("LOG_LEVEL", "info"), help="debug | info | warning | error")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.store or not args.store.startswith(("redis://", "rediss://")):
        parser.error("--store (or SLEEPSERVE_STORE) must be a redis://host:port/db URL")
    if args.passes is None and _env("SLEEP_PASSES"):
        args.passes = int(_env("SLEEP_PASSES") or 0)
    return args


def build_worker(args: argparse.Namespace) -> Worker:
    """The worker of `parse_args`'s options; FileNotFoundError or ValueError where its checkpoint is
    missing or cannot consolidate early."""
    model = load_checkpoint(args.checkpoint, args.device)
    if args.schedule and args.schedule != model.config.schedule:
        model.config = model.config.replace(schedule=args.schedule)  # as the server does: same fingerprint
    client = redis.Redis.from_url(args.store, socket_connect_timeout=2.0, socket_timeout=10.0)
    options = WorkerOptions(
        stream=args.stream,
        group=args.group,
        consumer=args.consumer,
        claim_after=args.claim_after,
        passes=args.passes,
        lease_ttl=args.lease_ttl,
        max_deliveries=args.max_deliveries,
        pause_seconds=float(os.environ.get("SLEEPSERVE_WORKER_PAUSE_SECONDS", "0")),
    )
    sessions = RedisSessions(client, args.session_ttl, args.key_prefix)
    return Worker(model, client, sessions, options, WorkerMetrics())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        worker = build_worker(args)
    except (FileNotFoundError, ValueError) as exc:  # no checkpoint, or one that cannot consolidate early
        print(f"sleepserve worker: {exc}", file=sys.stderr)
        return 2
    metrics = worker.metrics
    assert metrics is not None
    if args.metrics_port:
        start_http_server(args.metrics_port, registry=metrics.registry)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info(
        "worker %s: stream %s group %s, model %s, claim after %.1f s",
        args.consumer,
        args.stream,
        args.group,
        worker.fingerprint[:12],
        args.claim_after,
    )
    worker.run(stop)
    log.info("worker %s stopped: %s", args.consumer, worker.outcomes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
