#!/usr/bin/env python3
"""Time `vram-manager scenario` against the Python class it was ported from.

Side by side, from the repository root after `cargo build --release`:

    python3 benches/seed/compare.py --seed-class path/to/vram_manager.py --json

generates one trace (`gen_trace.py`, --steps steps, default 100,000) into a
temporary directory and runs the two whole processes alternately, --runs
times each (default 5), output to /dev/null:

    vram-manager scenario TRACE --json
    python3 benches/seed/drive_seed.py SEED_CLASS TRACE

Each run's wall time is taken around the child, and its peak RSS from
`os.wait4` (`ru_maxrss`, KiB on Linux) for that child alone.  Medians of the
wall times and the largest peak RSS of each side are reported.

Scaling of vram-manager alone over traces of 1k, 10k, 100k and 300k steps:

    python3 benches/seed/compare.py --scaling --json

The table goes to stdout, or to stderr with --json, so that stdout is one
JSON object.  The exit status is 1 if any child exits non-zero (vram-manager
exits 1 when a step fails and 2 on a bad file; the generated traces have no
step that can fail).
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

# Keep the benchmark from leaving a __pycache__ folder in the source tree.
sys.dont_write_bytecode = True
from gen_trace import write_trace  # noqa: E402  (the script's directory is on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DRIVER = os.path.join(HERE, "drive_seed.py")
DEFAULT_BINARY = os.path.join(REPO, "target", "release", "vram-manager")
SCALING_STEPS = (1_000, 10_000, 100_000, 300_000)


class ChildFailed(Exception):
    """A timed child process exited non-zero or was killed."""


def make_trace(directory, steps, seed):
    """Write the trace for `steps` steps into `directory` and return its path."""
    path = os.path.join(directory, f"trace-{steps}.toml")
    with open(path, "w", encoding="utf-8") as f:
        write_trace(steps, seed, f)
    return path


def run_child(argv, stderr_path):
    """Run `argv` to completion with stdout on /dev/null.

    Returns (wall seconds, peak RSS in MiB).  posix_spawn and wait4 are used
    directly, not subprocess, so the rusage read is exactly this child's and
    nothing else runs in this process between the two clock reads.  stderr
    goes to a file that is shown if the child fails.
    """
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
    ]
    start = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        with open(stderr_path, encoding="utf-8", errors="replace") as f:
            tail = f.read()[-2000:]
        how = f"exit status {code}" if code > 0 else f"signal {-code}"
        raise ChildFailed(f"{' '.join(argv)}: {how}\n{tail}")
    return wall, usage.ru_maxrss / 1024


def compare(args, workdir, table):
    """Alternate the two processes on one trace; return the summary dict."""
    print(f"generating a {args.steps}-step trace (seed {args.seed})", file=sys.stderr)
    trace = make_trace(workdir, args.steps, args.seed)
    stderr_path = os.path.join(workdir, "stderr.txt")
    sides = {
        "rust": [args.vram_manager, "scenario", trace, "--json"],
        "python": [args.python, DRIVER, args.seed_class, trace],
    }
    walls = {side: [] for side in sides}
    rss = {side: [] for side in sides}
    for run in range(1, args.runs + 1):
        # Alternating, not all of one then all of the other, so a drift in
        # the machine's load or clock affects both sides alike.
        for side, argv in sides.items():
            wall, peak = run_child(argv, stderr_path)
            walls[side].append(wall)
            rss[side].append(peak)
            print(f"run {run}/{args.runs} {side}: {wall:.3f} s, {peak:.1f} MiB", file=sys.stderr)

    rust_median = statistics.median(walls["rust"])
    python_median = statistics.median(walls["python"])
    print(f"{args.steps} steps, {args.runs} runs each", file=table)
    print(f"{'':<8}{'median s':>10}{'min s':>10}{'max s':>10}{'us/step':>10}{'peak MiB':>10}", file=table)
    for side, label in (("rust", "rust"), ("python", "python")):
        w = walls[side]
        print(
            f"{label:<8}{statistics.median(w):>10.3f}{min(w):>10.3f}{max(w):>10.3f}"
            f"{statistics.median(w) / args.steps * 1e6:>10.2f}{max(rss[side]):>10.1f}",
            file=table,
        )
    print(f"speedup (python / rust, medians): {python_median / rust_median:.2f}x", file=table)
    return {
        "steps": args.steps,
        "rust_wall_s_median": round(rust_median, 6),
        "python_wall_s_median": round(python_median, 6),
        "speedup": round(python_median / rust_median, 3),
        "rust_peak_rss_mib": round(max(rss["rust"]), 1),
        "python_peak_rss_mib": round(max(rss["python"]), 1),
        "runs": args.runs,
    }


def scaling(args, workdir, table):
    """Run vram-manager alone on growing traces; return the summary dict."""
    stderr_path = os.path.join(workdir, "stderr.txt")
    rows = []
    print(f"{'steps':>8}{'wall s':>10}{'us/step':>10}{'peak MiB':>10}", file=table)
    for steps in SCALING_STEPS:
        trace = make_trace(workdir, steps, args.seed)
        walls, peaks = [], []
        for _ in range(args.runs):
            wall, peak = run_child([args.vram_manager, "scenario", trace, "--json"], stderr_path)
            walls.append(wall)
            peaks.append(peak)
        # Traces are written one at a time and removed, so a 300k-step file
        # (about 11 MB) does not sit beside the others.
        os.remove(trace)
        wall = statistics.median(walls)
        row = {
            "steps": steps,
            "wall_s": round(wall, 6),
            "us_per_step": round(wall / steps * 1e6, 3),
            "peak_rss_mib": round(max(peaks), 1),
        }
        rows.append(row)
        print(f"{steps:>8}{row['wall_s']:>10.3f}{row['us_per_step']:>10.2f}{row['peak_rss_mib']:>10.1f}", file=table)
    return {"scaling": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Time `vram-manager scenario` against the Python class it was ported from."
    )
    parser.add_argument("--seed-class", metavar="PATH", help="the Python file defining VRAMManager (required unless --scaling)")
    parser.add_argument("--vram-manager", metavar="BIN", default=DEFAULT_BINARY, help="the binary (default: target/release/vram-manager of this repository)")
    parser.add_argument("--python", metavar="BIN", default=sys.executable, help="the interpreter for drive_seed.py (3.11+; default: this one)")
    parser.add_argument("--steps", type=int, default=100_000, help="trace length for the comparison (default 100000)")
    parser.add_argument("--runs", type=int, default=None, help="runs of each process (default 5; 1 per size with --scaling)")
    parser.add_argument("--seed", type=int, default=0, help="trace seed (default 0)")
    parser.add_argument("--scaling", action="store_true", help="time vram-manager alone on 1k, 10k, 100k and 300k steps")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (the table goes to stderr)")
    args = parser.parse_args(argv)

    if args.runs is None:
        args.runs = 1 if args.scaling else 5
    if args.runs < 1 or args.steps < 1:
        parser.error("--runs and --steps must be at least 1")
    if not args.scaling and not args.seed_class:
        parser.error("--seed-class is required (the Python file defining VRAMManager)")
    # posix_spawn does not search PATH: resolve the programs to real paths.
    args.vram_manager = os.path.abspath(args.vram_manager)
    if not os.access(args.vram_manager, os.X_OK):
        parser.error(f"{args.vram_manager} is not an executable; run `cargo build --release` first")
    python = shutil.which(args.python)
    if python is None:
        parser.error(f"{args.python} is not an executable")
    args.python = os.path.abspath(python)
    if args.seed_class:
        args.seed_class = os.path.abspath(args.seed_class)
        if not os.path.isfile(args.seed_class):
            parser.error(f"{args.seed_class} does not exist")

    table = sys.stderr if args.json else sys.stdout
    with tempfile.TemporaryDirectory(prefix="vram-seed-bench-") as workdir:
        try:
            result = scaling(args, workdir, table) if args.scaling else compare(args, workdir, table)
        except ChildFailed as err:
            print(f"compare.py: child failed: {err}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
