#!/usr/bin/env python3
"""Turns cargo-mutants' outcomes into the markdown table of docs/mutants.md.

Usage:
    scripts/mutants-table.py --command 'cargo mutants ...' \\
        [--dispositions docs/mutants-dispositions.tsv] \\
        FIRST/outcomes.json [LATER/outcomes.json ...] > docs/mutants.md

Each outcomes.json is one run (`mutants.out/outcomes.json`); a later run (e.g. with
`--iterate`, after tests were added) overrides an earlier one mutant by mutant. A mutant
missed first and caught later is listed as killed by the tests added since.

The dispositions file says, for each mutant left missed (or killed later), why: one line per
mutant, `KEY<TAB>DISPOSITION`, where KEY is the mutant's name as cargo-mutants prints it
(`crates/pool-core/src/lifecycle.rs:121:50: replace > with >= in ...`) or the same without
the `:line:col` (matching every such mutant of the function). Lines starting with `#` are
comments. A missed mutant without a disposition is shown as **untriaged**.

Only the standard library is used.
"""

import argparse
import json
import re
import shlex
import sys
from collections import OrderedDict, defaultdict

STATUS = {
    "CaughtMutant": "caught",
    "MissedMutant": "missed",
    "Timeout": "timeout",
    "Unviable": "unviable",
}
COLUMNS = ["caught", "missed", "timeout", "unviable"]


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def mutant_outcomes(run):
    """(name, file, status) for every mutant of one run, in the run's order."""
    for outcome in run["outcomes"]:
        scenario = outcome["scenario"]
        if not isinstance(scenario, dict) or "Mutant" not in scenario:
            continue  # the baseline
        mutant = scenario["Mutant"]
        status = STATUS.get(outcome["summary"], outcome["summary"])
        yield mutant["name"], mutant["file"], status


def without_position(name):
    """The mutant's name without `:line:col` (stable while lines move)."""
    return re.sub(r"^([^:]+):\d+:\d+:", r"\1:", name)


def read_dispositions(path):
    table = {}
    if not path:
        return table
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            if "\t" not in line:
                sys.exit(f"{path}:{n}: expected KEY<TAB>DISPOSITION")
            key, text = line.split("\t", 1)
            table[key.strip()] = text.strip()
    return table


def disposition(table, name):
    return table.get(name) or table.get(without_position(name))


def cell(text):
    return text.replace("|", "\\|")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--command", required=True, help="the cargo mutants command run")
    parser.add_argument("--dispositions", help="KEY<TAB>DISPOSITION file")
    parser.add_argument("--title", default="pool-core", help="what was mutated (the heading)")
    parser.add_argument("--output", default="docs/mutants.md", help="the file written (named in the text)")
    parser.add_argument(
        "--match-position",
        action="store_true",
        help="match a mutant to an earlier run's at the same :line:col first (for re-runs "
        "filtered to single mutants while the mutated code's lines stayed where they were)",
    )
    parser.add_argument(
        "--any-run",
        action="store_true",
        help="the runs differ in feature sets or in the tests they run: a mutant caught in any "
        "run is caught (code behind a feature is only tested in a build that compiles it; "
        "a run of the unit tests alone cannot catch what only a server test can)",
    )
    parser.add_argument("outcomes", nargs="+", help="outcomes.json of each run, oldest first")
    args = parser.parse_args()

    first = OrderedDict()  # name -> (file, status) in the first run that tested it
    final = OrderedDict()  # name -> (file, status) in the last run that tested it
    runs = []  # the tool's summary of each run
    exact = {}  # full name (with :line:col) -> key, as first seen
    for path in args.outcomes:
        outcomes = load(path)
        run = dict.fromkeys(COLUMNS, 0)
        seen = defaultdict(int)
        for name, file, status in mutant_outcomes(outcomes):
            # Lines move between runs (tests and fixes land in between): a mutant is its
            # name without `:line:col`, numbered among the same-named ones of its run (a
            # re-run then takes every mutant of the function). With --match-position, a
            # mutant an earlier run tested at the same `:line:col` is that mutant (re-runs
            # filtered to single mutants, where the code's lines did not move).
            stem = without_position(name)
            seen[stem] += 1
            key = (stem, seen[stem])
            if args.match_position:
                key = exact.setdefault(name, key)
            first.setdefault(key, (file, status, name))
            if not (args.any_run and final.get(key, (None, None))[1] == "caught"):
                final[key] = (file, status, name)
            run[status] = run.get(status, 0) + 1
        run["interrupted"] = outcomes.get("end_time") is None
        runs.append(run)
    table = read_dispositions(args.dispositions)

    counts = defaultdict(lambda: dict.fromkeys(COLUMNS, 0))
    for _key, (file, status, _name) in final.items():
        counts[file][status] = counts[file].get(status, 0) + 1
    totals = {c: sum(counts[f].get(c, 0) for f in counts) for c in COLUMNS}
    killed_later = [n for n in final if first[n][1] == "missed" and final[n][1] == "caught"]

    out = []
    dispositions = args.dispositions or "docs/mutants-dispositions.tsv"
    out.append(f"# Mutation testing of {args.title}")
    out.append("")
    out.append(
        "Generated by `scripts/mutants-table.py` from cargo-mutants' `outcomes.json`; "
        f"do not edit by hand (dispositions live in `{dispositions}`)."
    )
    out.append("")
    out.append(
        "Commands (run from the workspace root; a later run retests the functions whose "
        "mutants were not caught before (`-F` filters), after tests were added; mutants are "
        "matched across runs by name without `:line:col`):"
    )
    out.append("")
    if args.any_run:
        out.append(
            "The runs differ in the feature sets they build or in the tests they run: code "
            "behind a cargo feature is only tested in a build that compiles it, and a run of "
            "the unit tests alone cannot catch what only a server test can. So a mutant "
            "caught in any run counts as caught, whatever another run said of it."
        )
        out.append("")
    out.append("```sh")
    out.append(args.command)
    out.append("```")
    out.append("")
    kept = [p for p in args.outcomes if p.startswith("docs/")]
    out.append(
        "Each run replaces `mutants.out/` (gitignored): keep each run's "
        "`mutants.out/outcomes.json`"
        + (" (this file's runs are committed: " + ", ".join(f"`{p}`" for p in kept) + ")" if kept else "")
        + ", then regenerate this file with:"
    )
    out.append("")
    out.append("```sh")
    out.append(
        "scripts/mutants-table.py --command \"$(cat COMMANDS)\" "
        + ("--any-run " if args.any_run else "")
        + ("--match-position " if args.match_position else "")
        + (f"--title {shlex.quote(args.title)} " if args.title != "pool-core" else "")
        + f"--dispositions {dispositions} "
        + " ".join(
            path if path.startswith("docs/") else f"RUN{i + 1}/outcomes.json"
            for i, path in enumerate(args.outcomes)
        )
        + f" > {args.output}"
    )
    out.append("```")
    out.append("")
    for i, run in enumerate(runs, 1):
        tested = sum(run[c] for c in COLUMNS)
        stopped = " (interrupted: the rest was left for a later run)" if run["interrupted"] else ""
        out.append(
            f"- Run {i}: {tested} mutants tested: {run['missed']} missed, "
            f"{run['caught']} caught, {run['unviable']} unviable, {run['timeout']} timeouts"
            f"{stopped}."
        )
    out.append("")
    out.append(
        f"Mutants: {len(final)}. Caught {totals['caught']}, missed {totals['missed']}, "
        f"timeout {totals['timeout']}, unviable {totals['unviable']} (after the last run; "
        f"{len(killed_later)} of the caught were missed first and are killed by tests added "
        f"since)."
    )
    out.append("")
    out.append("| file | caught | missed | timeout | unviable |")
    out.append("|---|---:|---:|---:|---:|")
    for file in sorted(counts):
        c = counts[file]
        out.append(f"| `{file}` | " + " | ".join(str(c.get(k, 0)) for k in COLUMNS) + " |")
    out.append(
        "| **total** | " + " | ".join(f"**{totals[k]}**" for k in COLUMNS) + " |"
    )
    out.append("")

    def section(title, names, default):
        if not names:
            return
        out.append(f"## {title}")
        out.append("")
        by_file = defaultdict(list)
        for key in names:
            by_file[final[key][0]].append(final[key][2])
        for file in sorted(by_file):
            out.append(f"### `{file}`")
            out.append("")
            out.append("| mutant | disposition |")
            out.append("|---|---|")
            for n in by_file[file]:
                text = disposition(table, n) or default
                shown = n[len(file) + 1:] if n.startswith(file + ":") else n
                out.append(f"| `{cell(shown)}` | {cell(text)} |")
            out.append("")

    section(
        "Missed mutants",
        [n for n in final if final[n][1] == "missed"],
        "**untriaged**",
    )
    section(
        "Timeouts",
        [n for n in final if final[n][1] == "timeout"],
        "a mutant that makes a test hang is caught by the timeout",
    )
    section(
        "Missed first, killed by tests added since",
        killed_later,
        "caught on re-run",
    )
    print("\n".join(out))


if __name__ == "__main__":
    main()
