"""Soak: sustained mixed load on one server with its sessions in Redis, through a kill -9 of the server
and a restart of Redis, minute by minute.

`Workload.sessions` sessions (created first, `POST /v1/sessions`) on a real `redis-server` with AOF
(every write on disk before it answers), `Workload.in_flight` requests at all times: each client takes
an idle session and sends it one turn, a completion or a chat turn, streamed or not (seeded, a quarter
each), of `input_len` new random characters and `output_len` tokens (temperature 1, `ignore_eos`).
The server runs the shipped checkpoint with adaptive depth (`--sleep-passes auto`) and its defaults
otherwise. At `SERVER_KILL_AT` of the run the server is killed (SIGKILL) and started again on its
port; at `REDIS_RESTART_AT`, Redis is (SIGKILL, then started on its AOF). A request that overlaps a
restart window fails in it: from the kill until the process answers again, plus the session lease's
time to live (`lease_ttl`: a lease the dead process's requests held blocks its session that long);
any other failure breaks the first floor.

Per minute (by the time a request ended): ITL p50/p99 and TTFT p50/p99 of the streamed requests,
requests, errors by kind (`restart_window/...` in a restart window), and from the server's /metrics
the sleeps (`sleepserve_sleep_passes_count`) and deadline misses counted in it (summed over the killed
processes), and the server's RSS at its end. At the end every session is read back: its stored turns
(its version − 1) must equal the turns answered 200, and its tokens the `session_tokens_total` of its
last one. (A turn cut by a restart may have been saved before its answer was lost: such turns are
counted and printed, and `turns_stored` then exceeds `turns_ok`.) Writes bench/results/soak.json (with
each floor's value and whether it holds) and soak.png and prints the floors:
- 0 requests failed outside the restart windows;
- 0 sessions lost or inconsistent (turns stored = turns answered 200, tokens as the last answer said);
- RSS at the end of the last minute < 1.05x that at the end of the first;
- p99 ITL of the last minute <= 1.2x the first minute's;
- deadline misses <= 1% of sleeps.

The load generator runs on the same machine as the server: on 2 cores it takes the core the server's
threads leave to the sleeper process.

    python -m bench.soak                 # 8 minutes
    python -m bench.soak --smoke --out /tmp/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.decode_scaling import machine
from bench.procs import RedisProcess, ServerProcess
from bench.record import RESULTS, checkpoint_record, write_result
from bench.serve import random_text, stream_request
from bench.sleep_overlap import scrape
from bench.soak_report import floors, minutes, plot

SERVER_KILL_AT, REDIS_RESTART_AT = 0.4, 0.65  # of the run
KINDS = [(endpoint, stream) for endpoint in ("completion", "chat") for stream in (True, False)]


@dataclass
class Workload:
    minutes: int = 8
    minute_seconds: float = 60.0
    sessions: int = 32
    in_flight: int = 16
    input_len: int = 48
    output_len: int = 48
    lease_ttl: float = 15.0  # the server's session lease: a dead server's leases block this long
    seed: int = 0


SMOKE = Workload(
    minutes=3, minute_seconds=3.0, sessions=4, in_flight=2, input_len=16, output_len=8, lease_ttl=2.0
)


@dataclass
class Turn:
    """One request, as the client saw it (times in seconds since the start)."""

    session: str
    start: float
    end: float = 0.0
    ok: bool = False
    error: str = ""  # its kind
    ttft: float | None = None  # streamed ones only
    itl: list[float] = field(default_factory=list)
    session_tokens: int | None = None


@dataclass
class Outage:
    """A restart window: from the kill until the process answered again (plus `tail` seconds)."""

    what: str
    start: float
    end: float = float("inf")

    def covers(self, turn: Turn) -> bool:
        return turn.start < self.end and turn.end > self.start


def error_kind(error: str) -> str:
    """A short kind for a failed request's error text."""
    if error.startswith("HTTP "):
        status = error[5:8]
        try:
            code = json.loads(error.split(": ", 1)[1])["error"].get("code")
        except (ValueError, KeyError, IndexError, AttributeError, TypeError):
            code = None
        return f"http_{status}" + (f"_{code}" if code else "")
    if error.startswith("stream error: "):
        try:
            return "stream_" + str(json.loads(error[len("stream error: ") :]).get("code") or "error")
        except ValueError:
            return "stream_error"
    return error.split(":", 1)[0] or "unknown"


class Soak:
    def __init__(self, work: Workload, server: ServerProcess, redis_proc: RedisProcess) -> None:
        self.work, self.server, self.redis = work, server, redis_proc
        self.rng = random.Random(work.seed)
        self.turns: list[Turn] = []
        self.outages: list[Outage] = []
        self.sessions: dict[str, list[Turn]] = {}
        self.t0 = 0.0
        self.samples: list[dict[str, float]] = []  # per minute end: counters, rss
        self._base: Counter[str] = Counter()  # what the server processes killed so far counted

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def run(self) -> None:
        work = self.work
        async with httpx.AsyncClient(base_url=self.server.url, timeout=120) as client:
            for _ in range(work.sessions):
                response = await client.post("/v1/sessions")
                response.raise_for_status()
                self.sessions[response.json()["id"]] = []
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
            idle: asyncio.Queue[str] = asyncio.Queue()
            for session in self.rng.sample(list(self.sessions), len(self.sessions)):
                idle.put_nowait(session)
            duration = work.minutes * work.minute_seconds
            self.t0 = time.perf_counter()
            stop = asyncio.Event()
            clients = [
                asyncio.create_task(self._client(client, model, idle, stop, random.Random(work.seed + i)))
                for i in range(work.in_flight)
            ]
            await self._conduct(client, duration)
            stop.set()
            await asyncio.gather(*clients)

    async def _conduct(self, client: httpx.AsyncClient, duration: float) -> None:
        """Sample every minute; kill and restart the server, then Redis, at their moments."""
        events = [
            (SERVER_KILL_AT * duration, self._restart_server),
            (REDIS_RESTART_AT * duration, self._restart_redis),
        ]
        for minute in range(1, self.work.minutes + 1):
            end = minute * self.work.minute_seconds
            while events and events[0][0] < end:
                at, action = events.pop(0)
                await asyncio.sleep(max(0.0, at - self.now()))
                await action(client)
            await asyncio.sleep(max(0.0, end - self.now()))
            self.samples.append(await self._sample(client))

    async def _counters(self, client: httpx.AsyncClient) -> Counter[str]:
        """The server process's sleeps and deadline misses so far."""
        text = (await client.get("/metrics")).text
        return Counter(
            sleeps=scrape(text, "sleepserve_sleep_passes_count"),
            misses=scrape(text, "sleepserve_sleep_deadline_misses_total"),
        )

    async def _sample(self, client: httpx.AsyncClient) -> dict[str, float]:
        """The server's counters since the run began (across restarts) and its RSS now."""
        total = self._base + await self._counters(client)
        return {"sleeps": total["sleeps"], "misses": total["misses"], "rss": rss_bytes(self.server.pid)}

    async def _restart_server(self, client: httpx.AsyncClient) -> None:
        self._base += await self._counters(client)  # what the process about to die counted
        outage = Outage("server", self.now())
        self.outages.append(outage)
        self.server.kill()
        await asyncio.to_thread(self.server.start, 180.0, "/ready")
        outage.end = self.now() + self.work.lease_ttl  # its leases expire by then

    async def _restart_redis(self, client: httpx.AsyncClient) -> None:
        outage = Outage("redis", self.now())
        self.outages.append(outage)
        self.redis.kill()
        await asyncio.to_thread(self.redis.start)
        outage.end = self.now() + self.work.lease_ttl  # leases of requests it cut expire by then

    async def _client(
        self,
        client: httpx.AsyncClient,
        model: str,
        idle: asyncio.Queue[str],
        stop: asyncio.Event,
        rng: random.Random,
    ) -> None:
        while not stop.is_set():
            session = await idle.get()
            endpoint, stream = rng.choice(KINDS)
            turn = await self._turn(client, model, session, endpoint, stream, rng)
            self.turns.append(turn)
            self.sessions[session].append(turn)
            idle.put_nowait(session)
            if not turn.ok:  # a server or Redis that is down: do not spin on it
                await asyncio.sleep(0.5)

    async def _turn(
        self,
        client: httpx.AsyncClient,
        model: str,
        session: str,
        endpoint: str,
        stream: bool,
        rng: random.Random,
    ) -> Turn:
        text = random_text(rng, self.work.input_len)
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": self.work.output_len,
            "temperature": 1.0,
            "ignore_eos": True,
            "session_id": session,
            "stream": stream,
        }
        if endpoint == "chat":
            body["messages"] = [{"role": "user", "content": text}]
            path = "/v1/chat/completions"
        else:
            body["prompt"] = text
            path = "/v1/completions"
        turn = Turn(session, self.now())
        if stream:
            body["stream_options"] = {"include_usage": True}
            record = await stream_request(client, path, body, self.t0, len(text))
            turn.ok, turn.error = record.success, record.error
            if record.success:
                turn.ttft, turn.itl = record.ttft_s, record.itl_s
                turn.session_tokens = (record.usage or {}).get("session_tokens_total")
        else:
            try:
                response = await client.post(path, json=body)
                if response.status_code == 200:
                    turn.ok = True
                    turn.session_tokens = response.json()["usage"]["session_tokens_total"]
                else:
                    turn.error = f"HTTP {response.status_code}: {response.text}"
            except httpx.HTTPError as exc:
                turn.error = f"{type(exc).__name__}: {exc}"
        turn.end = self.now()
        if turn.ok and turn.session_tokens is None:
            turn.ok, turn.error = False, "no usage"
        turn.error = error_kind(turn.error) if not turn.ok else ""
        return turn

    async def check_sessions(self) -> dict[str, Any]:
        """Read every session back: lost (not there), and its stored turns and tokens against the
        answers. A turn cut in a restart window may have been stored all the same (the server saved it,
        then died before answering; Redis wrote it, then died before replying): such turns are counted
        (`unanswered`), and a session is inconsistent only if its stored turns are not between those
        answered 200 and those plus its cut ones, or, with as many as answered, its tokens differ
        from what the last answer said."""
        lost, inconsistent, stored = [], [], 0
        unanswered: Counter[str] = Counter()  # by the restart that cut them
        async with httpx.AsyncClient(base_url=self.server.url, timeout=60) as client:
            for session, turns in self.sessions.items():
                response = await client.get(f"/v1/sessions/{session}")
                if response.status_code != 200:
                    lost.append(session)
                    continue
                info = response.json()
                ok = [t for t in turns if t.ok]
                cut = {o.what for t in turns if not t.ok for o in self.outages if o.covers(t)}
                cut_turns = sum(not t.ok and any(o.covers(t) for o in self.outages) for t in turns)
                kept = info["version"] - 1
                stored += kept
                if kept > len(ok):
                    unanswered[" or ".join(sorted(cut)) or "no restart"] += kept - len(ok)
                tokens = ok[-1].session_tokens if ok else 0
                if not len(ok) <= kept <= len(ok) + cut_turns or (
                    kept == len(ok) and info["tokens_seen"] != tokens
                ):
                    inconsistent.append(session)
        return {"lost": lost, "inconsistent": inconsistent, "turns_stored": stored, "unanswered": unanswered}


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (/proc/<pid>/status VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="a small run for CI (about 15 s)")
    parser.add_argument("--minutes", type=int, help="run length (default 8)")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    parser.add_argument("--server-log", type=Path, help="the server's output (default: a temporary file)")
    parser.add_argument("--server-arg", action="append", default=[], help="an extra server flag (repeatable)")
    args = parser.parse_args(argv)
    work = SMOKE if args.smoke else Workload()
    if args.minutes:
        work = dataclasses.replace(work, minutes=args.minutes)
    with tempfile.TemporaryDirectory(prefix="soak-") as folder:
        redis_proc = RedisProcess(Path(folder), appendonly=True)
        server = ServerProcess(
            "server",
            ["--store", redis_proc.url, "--sleep-passes", "auto", *args.server_arg],
            args.server_log or Path(folder) / "server.log",
            {"OMP_NUM_THREADS": "1", "SLEEPSERVE_SESSION_LEASE_TTL": str(work.lease_ttl)},
        )
        try:
            redis_proc.start()
            server.start(probe="/ready")
            soak = Soak(work, server, redis_proc)
            asyncio.run(soak.run())
            checked = asyncio.run(soak.check_sessions())
        finally:
            server.stop()
            redis_proc.stop()
    report = {
        "machine": machine(),
        "minutes": minutes(soak),
        "sessions": work.sessions,
        "sessions_lost": len(checked["lost"]),
        "turns_ok": sum(t.ok for t in soak.turns),
        "turns_stored": checked["turns_stored"],
    }
    report["floors"] = floors(report, len(checked["inconsistent"]), checked["unanswered"])
    report = write_result(args.out, report, checkpoint_record())
    restarts = {"server": SERVER_KILL_AT * work.minutes, "redis": REDIS_RESTART_AT * work.minutes}
    plot(report, args.out.with_suffix(".png"), restarts)
    for row in report["minutes"]:
        print(json.dumps(row))
    for name, floor in report["floors"].items():
        print(f"{'HOLDS' if floor['holds'] else 'FAILS'}  {name}: {floor['value']}")
    return report


if __name__ == "__main__":
    main()
