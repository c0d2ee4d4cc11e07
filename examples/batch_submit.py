"""Generate an image for every line of a prompts file, as one Spool batch.

    export SPOOL_URL=http://127.0.0.1:8000 SPOOL_API_KEY=sk_...
    python examples/batch_submit.py prompts.txt --out results.jsonl --images out/

Each prompt becomes a job whose ``custom_id`` is its line number, so results can
be matched to prompts whatever order they finish in. Running the script again
on the same file returns the batch it already created (the Idempotency-Key is
derived from the file), so an interrupted run can simply be repeated.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from spool.client import Client, SpoolError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", type=Path, help="a text file, one prompt per line")
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512, help="width and height, a multiple of 8")
    parser.add_argument("--out", type=Path, default=Path("results.jsonl"))
    parser.add_argument("--images", type=Path, help="download the images into this directory")
    parser.add_argument("--poll-interval", type=float, default=5.0, help="seconds between looks")
    args = parser.parse_args()

    url = os.environ.get("SPOOL_URL", "http://127.0.0.1:8000")
    api_key = os.environ.get("SPOOL_API_KEY") or Path("var/dev-api-key").read_text().strip()

    lines = args.prompts.read_text(encoding="utf-8").splitlines()
    prompts = {f"line-{n}": text.strip() for n, text in enumerate(lines, 1) if text.strip()}
    jobs = [
        {
            "custom_id": custom_id,
            "kind": "image.generate",
            "model": args.model,
            "input": {
                "prompt": prompt,
                "steps": args.steps,
                "width": args.size,
                "height": args.size,
            },
        }
        for custom_id, prompt in prompts.items()
    ]
    # Same file and settings -> same key -> the same batch, never a duplicate.
    key = hashlib.sha256(json.dumps(jobs, sort_keys=True).encode()).hexdigest()

    with Client(url, api_key) as client:
        try:
            batch = client.submit_batch(jobs, idempotency_key=f"example-{key}")
            print(f"batch {batch['id']}: {len(jobs)} jobs", file=sys.stderr)

            def show(current: dict) -> None:
                counts = current["counts"]
                done = sum(counts.get(k, 0) for k in ("succeeded", "failed", "canceled", "expired"))
                print(f"  {done}/{counts['total']} done", file=sys.stderr)

            final = client.wait_batch(batch["id"], interval=args.poll_interval, on_update=show)
            print(f"batch {final['status']}: {final['counts']}", file=sys.stderr)

            if args.images:
                args.images.mkdir(parents=True, exist_ok=True)
            with args.out.open("w", encoding="utf-8") as out:
                for row in client.batch_results(batch["id"]):
                    row["prompt"] = prompts.get(row.get("custom_id") or "")
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    if args.images and row["status"] == "succeeded":
                        for i, image in enumerate(row["output"]["images"]):
                            client.download(
                                image["url"], args.images / f"{row['custom_id']}-{i}.png"
                            )
        except SpoolError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print(f"results in {args.out}", file=sys.stderr)
    return 0 if not final["counts"].get("failed") else 2  # 2: some prompts failed


if __name__ == "__main__":
    sys.exit(main())
