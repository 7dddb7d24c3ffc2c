"""bench.soak's report: the per-minute rows of soak.json from what the run saw, its floors and its
plot."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from bench.soak import Soak


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3 if values else 0.0


def minutes(soak: Soak) -> list[dict[str, Any]]:
    """The per-minute rows of soak.json (a request counts in the minute it ended)."""
    rows, before = [], {"sleeps": 0.0, "misses": 0.0}
    width = soak.work.minute_seconds
    for minute, sample in enumerate(soak.samples):
        turns = [t for t in soak.turns if minute * width <= t.end < (minute + 1) * width]
        itl = [gap for t in turns for gap in t.itl]
        ttft = [t.ttft for t in turns if t.ttft is not None]
        errors = Counter(
            ("restart_window/" if any(o.covers(t) for o in soak.outages) else "") + t.error
            for t in turns
            if not t.ok
        )
        rows.append(
            {
                "minute": minute,
                "itl_p50_ms": _percentile(itl, 50),
                "itl_p99_ms": _percentile(itl, 99),
                "ttft_p50_ms": _percentile(ttft, 50),
                "ttft_p99_ms": _percentile(ttft, 99),
                "requests": len(turns),
                "errors": dict(errors),
                "sleeps": round(sample["sleeps"] - before["sleeps"]),
                "deadline_misses": round(sample["misses"] - before["misses"]),
                "rss_bytes": int(sample["rss"]),
            }
        )
        before = sample
    return rows


def floors(report: dict[str, Any], inconsistent: int, unanswered: Counter[str]) -> dict[str, dict[str, Any]]:
    """Whether each floor holds, and its value. `unanswered`: turns stored whose answer never came, by
    the restart that cut them."""
    rows = report["minutes"]
    failed = sum(
        n for row in rows for kind, n in row["errors"].items() if not kind.startswith("restart_window/")
    )
    first, last = rows[0], rows[-1]
    sleeps = sum(row["sleeps"] for row in rows)
    misses = sum(row["deadline_misses"] for row in rows)
    rss_growth = last["rss_bytes"] / first["rss_bytes"] - 1
    itl_ratio = last["itl_p99_ms"] / first["itl_p99_ms"] if first["itl_p99_ms"] else float("inf")
    return {
        "no_failures_outside_restarts": {"holds": failed == 0, "value": failed},
        "no_session_lost_or_inconsistent": {
            "holds": report["sessions_lost"] == 0
            and inconsistent == 0
            and report["turns_stored"] == report["turns_ok"],
            "value": f"{report['sessions_lost']} lost, {inconsistent} inconsistent, "
            f"{report['turns_stored']} turns stored of {report['turns_ok']} answered 200 ({sum(unanswered.values())} "
            f"stored by requests cut in a restart window, whose answer never came: {dict(unanswered)})",
        },
        "rss_growth_under_5pct": {"holds": rss_growth < 0.05, "value": rss_growth},
        "last_minute_p99_itl_within_1_2x": {"holds": itl_ratio <= 1.2, "value": itl_ratio},
        "deadline_misses_at_most_1pct": {
            "holds": misses <= 0.01 * sleeps,
            "value": misses / sleeps if sleeps else 0.0,
        },
    }


def plot(report: dict[str, Any], path: Path, restarts: dict[str, float]) -> None:
    """Per minute: ITL and TTFT p50/p99, the server's RSS, deadline misses per 1000 sleeps; each
    restart (`restarts`: what -> the minute it came, fractional) marked on every panel. A minute's
    point sits at its middle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["minutes"]
    x = [row["minute"] + 0.5 for row in rows]
    fig, axes = plt.subplots(4, 1, figsize=(8, 10), sharex=True)
    axes[0].plot(x, [r["itl_p50_ms"] for r in rows], "o-", label="ITL p50")
    axes[0].plot(x, [r["itl_p99_ms"] for r in rows], "o-", label="ITL p99")
    axes[0].set_ylabel("ms")
    axes[1].plot(x, [r["ttft_p50_ms"] for r in rows], "o-", label="TTFT p50")
    axes[1].plot(x, [r["ttft_p99_ms"] for r in rows], "o-", label="TTFT p99")
    axes[1].set_ylabel("ms")
    axes[2].plot(x, [r["rss_bytes"] / 2**20 for r in rows], "o-", label="server RSS")
    axes[2].set_ylabel("MiB")
    per_mille = [1e3 * r["deadline_misses"] / r["sleeps"] if r["sleeps"] else 0.0 for r in rows]
    axes[3].bar(x, per_mille, width=0.6, label="deadline misses per 1000 sleeps (floor: 10)")
    axes[3].set_xlabel("minute")
    for ax in axes:
        for (what, at), color in zip(restarts.items(), ("red", "purple"), strict=False):
            ax.axvline(at, color=color, linestyle="--", alpha=0.6, label=f"{what} restart")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"soak: {report['sessions']} sessions on Redis, kill -9 and Redis restart ({report['machine']})",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
