"""Where one process's samples went, from a py-spy raw profile of a whole platform.

    py-spy record -s -f raw -o prof.txt -- python -m bench.bench_inference_platform ...
    python -m bench.profile_summary prof.txt[.gz] [--process "spool.cli worker"] [--under FUNC]

py-spy's raw format is one line per distinct stack, `frame;frame;... count`, and with
`-s` (subprocesses) each stack starts with `process PID:"command line"`. This prints the
share of the chosen process's samples per thread (named by the outermost frame of
Spool's or Celery's that tells them apart: the batch thread, the courier, the job threads,
kombu's loop...), then the heaviest callees of every frame whose name contains --under
(default: the LLM decode loop), so a profile taken on a GPU machine is read in one step.
"""

from __future__ import annotations

import argparse
import gzip
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

# Outermost frames that name a worker thread by what it does.
THREADS = (
    "MicroBatcher._loop",
    "Courier._loop",
    "Heartbeat._loop",
    "run_job",
    "asynloop",
    "_liveness_loop",
)
LINE = re.compile(r" \(([^:()]*):\d+\)")


def frames(line: str) -> tuple[str, list[str], int] | None:
    """(process, its frames without line numbers, samples) of one raw line."""
    stack, _, count = line.rstrip("\n").rpartition(" ")
    if not stack or not count.isdigit():
        return None
    parts = stack.split(";")
    starts = [i for i, f in enumerate(parts) if f.startswith("process ")]
    process = parts[starts[-1]] if starts else ""
    rest = parts[starts[-1] + 1 :] if starts else parts
    return process, [LINE.sub(r" (\1)", f) for f in rest], int(count)


def read(path: Path, process: str) -> Iterator[tuple[list[str], int]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        for line in f:
            got = frames(line)
            if got is not None and process in got[0] and got[1]:
                yield got[1], got[2]


def thread_of(stack: list[str]) -> str:
    for frame in stack:
        if any(frame.startswith(name + " ") for name in THREADS):
            return frame
    # Else the first frame past threading's own (Thread.run calls the thread's target).
    inner = [i for i, frame in enumerate(stack) if "(threading.py)" in frame]
    start = inner[-1] + 1 if inner and inner[-1] + 1 < len(stack) else 0
    return stack[start]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("profile", type=Path)
    ap.add_argument("--process", default="spool.cli worker", help="part of its command line")
    ap.add_argument("--under", default="LLMBackend._decode (", help="part of a frame's name")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)

    total = 0
    threads: Counter[str] = Counter()
    callees: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for stack, n in read(args.profile, args.process):
        total += n
        threads[thread_of(stack)] += n
        for i, frame in enumerate(stack):
            if args.under in frame:
                callees[frame][stack[i + 1] if i + 1 < len(stack) else "(itself)"] += n
    if not total:
        print(f"no samples of a process matching {args.process!r}")
        return 1
    print(f"{total} samples of {args.process!r}, by thread:")
    for name, n in threads.most_common(args.top):
        print(f"  {100 * n / total:5.1f} %  {name}")
    for frame, kids in callees.items():
        inside = sum(kids.values())
        print(f"\n{frame}: {inside} samples ({100 * inside / total:.1f} %), by callee:")
        for name, n in kids.most_common(args.top):
            print(f"  {100 * n / inside:5.1f} %  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
