"""What a sleep costs the decode thread that runs it: one sleep of N = 1-4 passes over a full chunk of
each of 8 sessions in one batch (what bench/sleep_overlap.py's 8 streams sleep at each boundary), and
of one session, on one torch thread (a server's), timed by `bench.decode_scaling.sleep_costs` (the
median of `--repeats` calls). The model is sleep_overlap's: the shipped checkpoint's config with
random weights. N = 1 is a sleep's last pass alone (memory-only: it stops at the last gdn block's delta
rule); each further N adds a full pass.

    python -m bench.sleep_pass            # writes bench/results/sleep_pass.{json,png}
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.decode_scaling import machine, sleep_costs
from bench.models import random_model_config
from bench.record import random_record, write_result

RESULTS = Path(__file__).resolve().parent / "results"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, sessions in enumerate(sorted({r["sessions"] for r in rows})):
        mine = [r for r in rows if r["sessions"] == sessions]
        ax.plot([r["passes"] for r in mine], [r["sleep_ms"] for r in mine], "o-", color=f"C{i}",
                label=f"{sessions} session(s): one sleep")  # fmt: skip
        ax.axhline(
            mine[0]["chunk_prefill_ms"], color=f"C{i}", linestyle=":", label=f"{sessions}: one prefill"
        )
    ax.set(xlabel="passes N", ylabel="ms (median)", title="What one sleep costs the decode thread")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.sleep_pass", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200, help="sleeps timed per row")
    parser.add_argument("--out", type=Path, default=RESULTS / "sleep_pass.json")
    args = parser.parse_args(argv)
    config, threads = random_model_config(None), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = [
            row
            for sessions in (8, 1)
            for row in sleep_costs(config, [1, 2, 3, 4], args.repeats, sessions=sessions)
        ]
    finally:
        torch.set_num_threads(threads)  # the caller's (a test's, say), as it was
    report = {"machine": machine(), "threads": 1, "config": config.to_dict(), "sleeps": rows}
    for row in rows:
        print(
            f"{row['sessions']} session(s), N = {row['passes']}: {row['sleep_ms']:.2f} ms "
            f"(a prefill of the same chunks {row['chunk_prefill_ms']:.2f} ms)"
        )
    report = write_result(args.out, report, random_record(config))
    plot(rows, args.out.with_suffix(".png"))
    return report


if __name__ == "__main__":
    main()
