"""Render the generated parts of README.md and docs/*.md from their sources: the results tables from
bench/results/*.json (so every published figure is one a result file holds) and the settings table from
server/settings.py. Each part sits between two marker comments,

    <!-- BEGIN generated:NAME (python -m bench.report) -->
    <!-- END generated:NAME -->

and is rewritten whole; the text around it is left alone. tests/bench/test_results.py fails when a
document differs from what this would write.

    python -m bench.report            # rewrite the generated parts
    python -m bench.report --check    # exit 1, naming the parts, where they are out of date
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.record import RESULTS, ROOT
from bench.settings_table import settings_table

DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "benchmarks.md")
MARKERS = re.compile(
    r"(<!-- BEGIN generated:(?P<name>[\w-]+) \(python -m bench\.report\) -->\n)(?P<body>.*?)"
    r"(<!-- END generated:(?P=name) -->)",
    re.S,
)


def _load(results: Path, name: str) -> dict[str, Any]:
    return json.loads((results / name).read_text())


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


def _kib_or_bytes(n: float) -> str:
    return f"{n:,.0f} B" if n < 2**20 else _mib(n)


def _value(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.2f}"


def _machine(report: dict[str, Any]) -> str:
    return f"Machine: {report['machine']}; commit {report['provenance']['commit'][:12]}."


# -- one table per benchmark (docs/benchmarks.md) -----------------------------------------------------


def decode_scaling(results: Path) -> str:
    report = _load(results, "decode_scaling.json")
    by = {(r["system"], r["position"]): r for r in report["results"]}
    positions = sorted({r["position"] for r in report["results"]})
    rows = [
        [
            f"{p:,}",
            f"{by['hybrid-hard', p]['median_ms']:.2f}",
            f"{by['hybrid-lagged', p]['median_ms']:.2f}",
            f"{by['full-attention', p]['median_ms']:.2f}",
            f"{by['hybrid-lagged', p]['state_bytes']:,} B",
            _mib(by["full-attention", p]["state_bytes"]),
        ]
        for p in positions
    ]
    header = ["context position", "hybrid `hard` ms/token", "hybrid `lagged` ms/token"]
    header += ["full attention ms/token", "session state (`lagged`)", "full-attention KV cache"]
    sleeps = [
        [
            f"`{r['schedule']}`",
            str(r["passes"]),
            f"{r['sleep_ms']:.2f}",
            f"{r['sleep_ms'] / (r['passes'] * r['chunk_prefill_ms']):.2f}",
        ]
        for r in report["sleep"]
    ]
    sleep_header = ["schedule", "N", "one sleep (ms)", "sleep / (N × one prefill of the window)"]
    return "\n\n".join([_table(header, rows), _table(sleep_header, sleeps), _machine(report)])


def state(results: Path) -> str:
    report = _load(results, "state.json")
    rows = [
        [
            f"{r['context_tokens']:,}",
            f"{r['state_bytes']:,} B",
            _mib(r["full_attention_kv_bytes"]),
            f"{r['full_attention_kv_bytes'] / r['state_bytes']:,.0f}×",
            *(f"{r[store]['round_trip_ms']:.2f}" for store in report["stores"]),
        ]
        for r in report["results"]
    ]
    header = ["context (tokens)", "session blob", "full-attention KV cache", "ratio"]
    header += [f"{store} store save + load (ms)" for store in report["stores"]]
    return "\n\n".join([_table(header, rows), _machine(report)])


def sleep_pass(results: Path) -> str:
    report = _load(results, "sleep_pass.json")
    rows = [
        [str(r["sessions"]), str(r["passes"]), f"{r['sleep_ms']:.2f}", f"{r['chunk_prefill_ms']:.2f}"]
        for r in report["sleeps"]
    ]
    header = ["sessions in the batch", "N", "one sleep (ms)", "one prefill of the same windows (ms)"]
    return "\n\n".join([_table(header, rows), _machine(report)])


def _served_rows(systems: list[dict[str, Any]], offloaded: bool) -> list[list[str]]:
    rows = []
    for s in systems:
        row = [f"`{s['name']}`", f"{s['itl_p50_ms']:.2f}", f"{s['itl_p99_ms']:.2f}"]
        row += [str(s["deadline_misses"]), f"{s['mean_passes']:.2f}"]
        row += [f"{s['step_ms_none']:.2f}", f"{s['step_ms_crossed']:.2f}"]
        if offloaded:
            row.append(f"{s['offloaded_passes']} / {s['rolling_passes']}" if s["rolling_passes"] else "–")
        rows.append(row)
    return rows


SERVED_HEADER = ["system", "ITL p50 (ms)", "ITL p99 (ms)", "deadline misses", "mean N", "step (ms)"]
SERVED_HEADER += ["crossing step (ms)"]


def sleep_overlap(results: Path) -> str:
    report = _load(results, "sleep_overlap.json")
    table = _table([*SERVED_HEADER, "passes offloaded"], _served_rows(report["systems"], offloaded=True))
    floors = ", ".join(f"`{name}` {'holds' if held else 'FAILS'}" for name, held in report["floors"].items())
    return "\n\n".join([table, f"Floors: {floors}.", _machine(report)])


def engine_itl(results: Path) -> str:
    report = _load(results, "engine_itl.json")
    table = _table(SERVED_HEADER, _served_rows(report["systems"], offloaded=False))
    ratio = f"`lagged-scheduled`'s p99 / `no-sleep`'s: {report['p99_ratio']:.2f}×."
    return "\n\n".join([table, ratio, _machine(report)])


def multiturn(results: Path) -> str:
    report = _load(results, "serve_multiturn.json")
    systems = report["systems"]
    header = ["turn", "context (tokens)"] + [f"{s['name']} ITL p50 / p99 (ms)" for s in systems]
    header += [f"{s['name']} TTFT p50 (ms)" for s in systems]
    rows = []
    for turn, point in enumerate(systems[0]["by_context"]):
        points = [s["by_context"][turn] for s in systems]
        row = [str(turn + 1), f"{point['context_tokens']:,}"]
        row += [f"{p['itl_p50_ms']:.1f} / {p['itl_p99_ms']:,.1f}" for p in points]
        row += [f"{p['ttft_p50_ms']:,.0f}" for p in points]
        rows.append(row)
    totals = [
        [
            s["name"],
            f"{s['output_tokens_per_s']:,.0f}",
            _kib_or_bytes(s["state_bytes_by_context"][-1]["bytes"]),
        ]
        for s in systems
    ]
    concurrency = report["workload"]["concurrency"]
    totals_header = ["system", f"output tokens/s at {concurrency} concurrent", "per-session state, last turn"]
    floors = [
        [f"`{name}`", "holds" if f["holds"] else "FAILS", _value(f["value"]), f["threshold"]]
        for name, f in report["floors"].items()
    ]
    return "\n\n".join(
        [
            _table(header, rows),
            _table(totals_header, totals),
            _table(["floor", "", "value", "threshold"], floors),
            _machine(report),
        ]
    )


def evaluation(results: Path) -> str:
    report = _load(results, "evaluation.json")
    depths = list(report["accuracy"])
    first = report["accuracy"][depths[0]]
    rows = [
        [task, difficulty] + [f"{report['accuracy'][d][task][difficulty]['exact']:.2f}" for d in depths]
        for task, table in first.items()
        for difficulty in table
    ]
    header = ["task", "difficulty"] + [f"exact, {d}" for d in depths]
    note = f"{report['per_difficulty']} held-out examples per task and difficulty; trained at N = "
    note += f"{report['trained_passes']}, `{report['schedule']}`."
    return "\n\n".join([_table(header, rows), note, _machine(report)])


def _pm(entry: dict[str, float | None]) -> str:
    se = entry["se"]
    return f"{entry['mean']:+.3f}" + ("" if se is None else f" ± {se:.3f}")


def reproduction(results: Path) -> str:
    report = _load(results, "reproduction.json")
    summary = report["summary"]
    rows = [[f"`{run}`", _pm(entry).lstrip("+")] for run, entry in summary["mean_exact"].items()]
    deep = ", ".join(summary["deep_t"])
    table = _table(["run", f"exact on t ∈ {{{deep}}}, mean ± s.e. over seeds"], rows)
    differences = [
        [f"`{name}`", _pm(summary[name])]
        for name in (
            "hard_n4_minus_n1",
            "hard_n2_minus_n1",
            "lagged_n4_minus_hard_n4",
            "hard_n4_minus_control",
        )
        if name in summary
    ]
    return "\n\n".join([table, _table(["difference (paired by seed)", "exact"], differences)])


# -- the README's one short table -------------------------------------------------------------------


def real_decode(results: Path) -> str:
    report = _load(results, "real_decode.json")
    systems = {s["name"]: s for s in report["systems"]}
    ours, theirs = systems["sleepserve"], systems["transformers"]
    rows = [
        [
            f"{a['context_tokens']:,}",
            f"{a['itl_ms']:.2f}",
            f"{b['itl_ms']:.2f}",
            _mib(a["state_bytes"]),
            _mib(b["state_bytes"]),
        ]
        for a, b in zip(ours["by_context"], theirs["by_context"], strict=True)
    ]
    header = ["context tokens", "sleepserve ms/token", "transformers ms/token", "sleepserve state"]
    table = _table([*header, "transformers cache"], rows)
    first, last = ours["by_context"][0], ours["by_context"][-1]
    throughput = (
        f"Output tokens/s at {report['workload']['concurrent']} concurrent requests: sleepserve "
        f"{ours['output_tokens_per_s']:,.0f}, transformers {theirs['output_tokens_per_s']:,.0f} "
        f"(×{ours['output_tokens_per_s'] / theirs['output_tokens_per_s']:.1f}; {theirs['method']}). "
        f"sleepserve's ITL at {last['context_tokens']:,} tokens is ×{last['itl_ms'] / first['itl_ms']:.2f} "
        f"its ITL at {first['context_tokens']:,}."
    )
    model = report["model"]
    shape = (
        f"Model: a Qwen3.5-shaped config with random weights, {model['parameters']:,} parameters, layers "
        f"{model['layers']}, window {model['window']} (`{model['schedule']}`, N = {model['sleep_passes']})."
    )
    return "\n\n".join([table, throughput, shape, _machine(report)])


def soak(results: Path) -> str:
    report = _load(results, "soak.json")
    rows = [
        [
            str(m["minute"]),
            f"{m['itl_p50_ms']:.2f}",
            f"{m['itl_p99_ms']:.2f}",
            f"{m['ttft_p50_ms']:.0f}",
            f"{m['ttft_p99_ms']:.0f}",
            f"{m['requests']:,}",
            ", ".join(f"{kind} {n}" for kind, n in m["errors"].items()) or "–",
            f"{m['deadline_misses']} / {m['sleeps']:,}",
            _mib(m["rss_bytes"]),
        ]
        for m in report["minutes"]
    ]
    header = ["minute", "ITL p50 (ms)", "ITL p99 (ms)", "TTFT p50 (ms)", "TTFT p99 (ms)", "requests"]
    table = _table([*header, "errors", "deadline misses / sleeps", "server RSS"], rows)
    floors = "; ".join(
        f"`{name}` {'holds' if floor['holds'] else 'FAILS'} ({_floor_value(floor['value'])})"
        for name, floor in report["floors"].items()
    )
    sessions = (
        f"{report['sessions']} sessions, {report['sessions_lost']} lost; {report['turns_ok']:,} turns "
        f"answered 200, {report['turns_stored']:,} stored."
    )
    return "\n\n".join([table, sessions, f"Floors: {floors}.", _machine(report)])


def _floor_value(value: float | int | str) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def readme_results(results: Path) -> str:
    scaling = {(r["system"], r["position"]): r for r in _load(results, "decode_scaling.json")["results"]}
    far = max(p for _, p in scaling)
    served = _load(results, "serve_multiturn.json")
    floors = served["floors"]
    systems = {s["name"]: s for s in served["systems"]}
    last = systems["sleepserve"]["by_context"][-1]["context_tokens"]
    overlap = {s["name"]: s for s in _load(results, "sleep_overlap.json")["systems"]}
    lagged, plain = overlap["lagged-scheduled"], overlap["no-sleep"]
    states = _load(results, "state.json")["results"]
    evaluation = _load(results, "evaluation.json")
    trained = evaluation["accuracy"][f"N={evaluation['trained_passes']}"]
    accuracy = "; ".join(
        f"{task} " + " / ".join(f"{row['exact']:.0%}" for row in table.values())
        for task, table in trained.items()
    )
    deeper = _load(results, "reproduction.json")["summary"]["hard_n4_minus_n1"]
    soaked = _load(results, "soak.json")
    sleeps, misses = (sum(m[key] for m in soaked["minutes"]) for key in ("sleeps", "deadline_misses"))
    real = _load(results, "real_decode.json")
    real_ours, real_theirs = (
        {s["name"]: s for s in real["systems"]}[n] for n in ("sleepserve", "transformers")
    )
    link = "docs/benchmarks.md#"
    rows = [
        [
            f"decode at {far:,} tokens of context: {scaling['hybrid-lagged', far]['median_ms']:.2f} ms/token "
            f"(full attention {scaling['full-attention', far]['median_ms']:.2f})",
            f"[decode scaling]({link}decode-scaling)",
        ],
        [
            f"session state {states[-1]['state_bytes']:,} B at any length "
            f"(full-attention KV cache at {states[-1]['context_tokens']:,} tokens: "
            f"{_mib(states[-1]['full_attention_kv_bytes'])})",
            f"[state]({link}state)",
        ],
        [
            f"4 sessions growing to {last:,} tokens: p99 ITL ×{floors['sleepserve_p99_itl_flat']['value']:.2f} "
            f"from the first turn to the last (full attention ×{floors['full_attention_p99_itl_grows']['value']:.1f})",
            f"[multi-turn]({link}multi-turn)",
        ],
        [
            f"throughput at {served['workload']['concurrency']} concurrent: "
            f"{systems['sleepserve']['output_tokens_per_s']:,.0f} tokens/s "
            f"(transformers {systems['transformers']['output_tokens_per_s']:,.0f})",
            f"[multi-turn]({link}multi-turn)",
        ],
        [
            f"sleep off the decode path: p99 ITL ×{lagged['itl_p99_ms'] / plain['itl_p99_ms']:.2f} of no sleep's, "
            f"{lagged['deadline_misses']} deadline misses, N = {lagged['mean_passes']:.2f}",
            f"[sleep overlap]({link}sleep-overlap)",
        ],
        [
            f"Qwen3.5-shaped model ({real['model']['parameters'] / 1e6:.0f}M, random weights): "
            f"{real_ours['by_context'][-1]['itl_ms']:.1f} ms/token at {real_ours['by_context'][-1]['context_tokens']:,} "
            f"tokens (transformers {real_theirs['by_context'][-1]['itl_ms']:.1f}); "
            f"{real_ours['output_tokens_per_s'] / real_theirs['output_tokens_per_s']:.1f}× its throughput",
            f"[real decode]({link}real-decode)",
        ],
        [
            f"{soaked['sessions']} sessions on Redis for {len(soaked['minutes'])} min through a kill -9 and a Redis "
            f"restart: {soaked['sessions_lost']} lost, {misses:,} deadline misses in {sleeps:,} sleeps, last "
            f"minute's p99 ITL ×{soaked['minutes'][-1]['itl_p99_ms'] / soaked['minutes'][0]['itl_p99_ms']:.2f} "
            f"the first's",
            f"[soak]({link}soak)",
        ],
        [
            f"shipped model, exact answers by difficulty: {accuracy}",
            f"[evaluation]({link}evaluation)",
        ],
        [
            f"deeper sleep helps (Rule 110, hardest t): N = 4 − N = 1 = {_pm(deeper)} exact",
            f"[reproduction]({link}reproduction)",
        ],
    ]
    return _table(["figure", "benchmark"], rows)


RENDERERS: dict[str, Callable[[Path], str]] = {
    "results-readme": readme_results,
    "results-decode-scaling": decode_scaling,
    "results-state": state,
    "results-sleep-pass": sleep_pass,
    "results-sleep-overlap": sleep_overlap,
    "results-engine-itl": engine_itl,
    "results-multiturn": multiturn,
    "results-evaluation": evaluation,
    "results-reproduction": reproduction,
    "results-real-decode": real_decode,
    "results-soak": soak,
    "settings": lambda _: settings_table(),
}


def render(text: str, results: Path = RESULTS) -> str:
    """`text` with every generated part rewritten from its source."""

    def part(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise KeyError(f"unknown generated part {name!r} (known: {', '.join(RENDERERS)})")
        return match.group(1) + RENDERERS[name](results).strip() + "\n" + match.group(4)

    return MARKERS.sub(part, text)


def stale_parts(path: Path, results: Path = RESULTS) -> list[str]:
    """Names of the generated parts of the document at `path` that differ from a fresh rendering."""
    text = path.read_text()
    fresh = {m["name"]: m["body"] for m in MARKERS.finditer(render(text, results))}
    return [m["name"] for m in MARKERS.finditer(text) if m["body"] != fresh[m["name"]]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 where out of date")
    args = parser.parse_args(argv)
    stale = {path: stale_parts(path) for path in DOCUMENTS}
    for path, names in stale.items():
        if names and args.check:
            print(f"{path.relative_to(ROOT)}: out of date: {', '.join(names)} (run python -m bench.report)")
        elif names:
            path.write_text(render(path.read_text()))
            print(f"{path.relative_to(ROOT)}: rewrote {', '.join(names)}")
    return 1 if args.check and any(stale.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
