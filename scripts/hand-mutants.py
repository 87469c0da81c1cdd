#!/usr/bin/env python3
"""Runs the hand mutations listed in a TOML file and writes the table of what each did.

cargo-mutants cannot make every mutation that matters (it does not know that `QueryResult<()>`
is a `Result`, it cannot swap a call for another, remove a branch's effect, or change code
that does not compile to one expression), so those are listed by hand in
`docs/hand-mutants.toml`:

    [[mutation]]
    id = "sync-panicking-checkin"
    mechanism = "sync: close a connection returned during a panic"
    edits = [{ file = "crates/diesel-r2d2-ext/src/manager.rs",
               find = "let panicking = std::thread::panicking();",
               replace = "let panicking = false;" }]
    command = "cargo test --features metrics --test pg_mechanisms panicking"
    expect = ["a_connection_returned_by_a_panicking_thread_is_closed_even_outside_a_transaction"]
    note = "optional: why it is not caught, or what catches it instead"

Each mutation: every `find` must occur exactly once in its file (else the row is "stale": the
code moved on and the row must be updated); the edits are applied, `command` runs with
`CI=true` under a time limit, and the files are restored (also on Ctrl-C or an error). The
outcome is

* caught: the command failed and every test named in `expect` is among its failures;
* caught by others: the command failed, but not (only) by the expected tests;
* missed: the command passed with the mutation in place;
* timeout: the command did not end within the limit (a test that hangs is a broken test);
* unviable: the mutated code did not build;
* stale: a `find` string is not in its file exactly once.

Run it from the workspace root on a clean tree (it refuses files with uncommitted changes):

    scripts/hand-mutants.py docs/hand-mutants.toml --json docs/hand-mutants.json \
        > docs/hand-mutants.md

`--only ID` (repeatable) runs some rows; `--table-only FILE.json` rewrites the table from a
previous run's JSON without running anything.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib

FAILED_TEST = re.compile(r"^test (\S+) \.\.\. FAILED", re.M)
PANICKED = re.compile(r"^thread '([^']+)' \(\d+\) panicked at", re.M)
BUILD_ERROR = re.compile(r"^error(\[E\d+\])?: ", re.M)


def load(path):
    with open(path, "rb") as f:
        rows = tomllib.load(f)["mutation"]
    ids = [r["id"] for r in rows]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        sys.exit(f"duplicate ids: {sorted(dup)}")
    return rows


def dirty(path):
    return subprocess.run(["git", "diff", "--quiet", "--", path]).returncode != 0


def run_one(row, limit):
    originals = {}
    for edit in row["edits"]:
        path = edit["file"]
        if path not in originals:
            if dirty(path):
                sys.exit(f"{path} has uncommitted changes: commit or stash them first")
            with open(path) as f:
                originals[path] = f.read()
    texts = dict(originals)
    for edit in row["edits"]:
        n = texts[edit["file"]].count(edit["find"])
        if n != 1:
            return {"outcome": "stale", "detail": f"{edit['file']}: found {n} times: {edit['find']!r}"}
        texts[edit["file"]] = texts[edit["file"]].replace(edit["find"], edit["replace"], 1)
    started = time.monotonic()
    try:
        for path, text in texts.items():
            with open(path, "w") as f:
                f.write(text)
        env = dict(os.environ, CI="true")
        proc = subprocess.Popen(
            row["command"], shell=True, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            return {"outcome": "timeout", "seconds": round(time.monotonic() - started),
                    "detail": f"no end within {limit} s"}
    finally:
        for path, text in originals.items():
            with open(path, "w") as f:
                f.write(text)
    seconds = round(time.monotonic() - started)
    # Test threads carry the test's name; other threads that panicked (helpers the test
    # spawned) do not name a test.
    failed = sorted((set(FAILED_TEST.findall(out)) | set(PANICKED.findall(out)))
                    - {"main", "<unnamed>"})
    if proc.returncode == 0:
        return {"outcome": "missed", "seconds": seconds, "failed": []}
    if not failed and BUILD_ERROR.search(out):
        first = BUILD_ERROR.search(out)
        line = out[first.start():].splitlines()[0]
        return {"outcome": "unviable", "seconds": seconds, "detail": line}
    expect = row.get("expect", [])
    short = [f.split("::")[-1] for f in failed]
    if all(any(e == s or s.endswith(e) or e in s for s in short) for e in expect) and failed:
        return {"outcome": "caught", "seconds": seconds, "failed": failed}
    return {"outcome": "caught by others", "seconds": seconds, "failed": failed,
            "detail": out[-2000:]}


def table(rows, results, source, command):
    counts = {}
    for r in results.values():
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    lines = [
        "# Hand mutations: the mechanism -> test table",
        "",
        f"Generated by `scripts/hand-mutants.py` from `{source}` (the mutations: exact edits, the",
        "command, the tests expected to fail); do not edit by hand. Command:",
        "",
        "```sh",
        command,
        "```",
        "",
        "Outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + (f" ({len(results)} run of the {len(rows)} listed; the rest at the end: not run yet)."
           if len(results) < len(rows) else f" (all {len(rows)} listed)."),
        "",
        "| mechanism | mutation | outcome | failing tests (with the mutation) | s |",
        "|---|---|---|---|---|",
    ]
    not_run = [row["id"] for row in rows if row["id"] not in results]
    for row in rows:
        res = results.get(row["id"])
        if res is None:
            continue
        mutation = row.get("mutation") or "; ".join(
            f"`{e['file'].split('/')[-1]}`: `{e['find'].strip()[:60]}` -> `{e['replace'].strip()[:60]}`"
            for e in row["edits"])
        failed = [f for f in res.get("failed", []) if f not in ("main", "<unnamed>")]
        shown = ", ".join(f"`{f}`" for f in failed) or res.get("detail", "")
        outcome = res["outcome"]
        if outcome != "caught":
            outcome = f"**{outcome}**"
        if row.get("note"):
            # Why a mutation is not caught, or what catches it instead (written after a run).
            outcome += ": " + row["note"]
        cells = [c.replace("|", "\\|") for c in (row["mechanism"], mutation, shown[:400])]
        lines.append(f"| {cells[0]} | {cells[1]} | {outcome} | {cells[2]} | "
                     f"{res.get('seconds', '')} |")
    if not_run:
        lines += ["", "Not run yet: " + ", ".join(f"`{i}`" for i in not_run) + "."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("toml")
    ap.add_argument("--json", help="write the outcomes here (and merge with it if it exists)")
    ap.add_argument("--only", action="append", default=[])
    ap.add_argument("--limit", type=int, default=600, help="seconds per mutation")
    ap.add_argument("--stop-after", type=int, default=0,
                    help="start no mutation after this many seconds (the rest: not run)")
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from --json")
    args = ap.parse_args()
    rows = load(args.toml)
    results = {}
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            results = json.load(f)
    command = "scripts/hand-mutants.py " + " ".join(
        a for a in sys.argv[1:] if a != "--table-only")
    if not args.table_only:
        began = time.monotonic()
        for row in rows:
            if args.only and row["id"] not in args.only:
                continue
            if args.stop_after and time.monotonic() - began > args.stop_after:
                print(f"stopping: --stop-after {args.stop_after} s", file=sys.stderr)
                break
            print(f"{time.strftime('%H:%M:%S')} {row['id']} ...", file=sys.stderr, flush=True)
            res = run_one(row, args.limit)
            results[row["id"]] = res
            print(f"  {res['outcome']} ({res.get('seconds', 0)} s) {res.get('failed', '')}",
                  file=sys.stderr, flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1, sort_keys=True)
    known = {r["id"] for r in rows}
    results = {k: v for k, v in results.items() if k in known}
    sys.stdout.write(table(rows, results, args.toml, command))


if __name__ == "__main__":
    main()
