"""Pulling a model from S3 into the node cache against a plain boto3 download, same run.

Starts ``moto_server`` on loopback, pushes the embedded SmolLM2-135M (about 540 MB) with
``S3Store.push``, then alternates two ways of getting every file:

- baseline: ``client.download_file`` per object with boto3's default transfer settings
  (8 MB parts), what ``aws s3 cp --recursive`` does;
- same parts: the same, with the store's own transfer settings (64 MB parts), so the
  difference to ``fleet`` is what listing, verifying and the cache cost;
- fleet: ``fetch_to_cache`` into a fresh cache (lists, reads the manifest, downloads,
  checks each file's sha256, writes the marker, renames into place).

moto answers every ranged GET by copying the whole object, so on moto the part size
dominates and "baseline" is far slower than against real S3, MinIO or Ceph; compare
"fleet" with "same parts" for the cost of verification.

Prints median MB/s of each and the ratios. Never asserted in tests.

    .venv/bin/python bench/s3_pull.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llm_fleet.deployments.weights import embedded  # noqa: E402
from llm_fleet.deployments.weights.cache import LoadPolicy, fetch_to_cache  # noqa: E402
from llm_fleet.deployments.weights.s3_store import S3Store, _transfer_config  # noqa: E402
from llm_fleet.deployments.weights.sources import parse_source  # noqa: E402
from tests.weights.s3server import start_s3_server  # noqa: E402

MODEL = "smollm2-135m-instruct"
BUCKET, PREFIX = "bench-weights", "smollm2/v1"


def baseline(client: Any, dest: Path, config: Any = None) -> None:
    """Every object under the prefix, one ``download_file`` each, as ``aws s3 cp`` does."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/")
    for page in pages:
        for item in page.get("Contents", []):
            target = dest / item["Key"].removeprefix(f"{PREFIX}/")
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(BUCKET, item["Key"], str(target), Config=config)


def fleet(dest: Path) -> None:
    source = parse_source(f"s3://{BUCKET}/{PREFIX}")
    fetch_to_cache(S3Store(source), source.cache_key(), LoadPolicy(), root=dest)


def timed(work: Any, scratch: Path) -> float:
    """Seconds ``work(folder)`` takes into a fresh folder, removed afterwards."""
    dest = Path(tempfile.mkdtemp(dir=scratch))
    try:
        started = time.perf_counter()
        work(dest)
        return time.perf_counter() - started
    finally:
        shutil.rmtree(dest)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    folder = embedded.prepare(MODEL)
    model_bytes = sum(
        p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
    )
    with tempfile.TemporaryDirectory(prefix="s3-pull-bench-") as scratch_name:
        scratch = Path(scratch_name)
        server = start_s3_server(scratch / "server")
        try:
            os.environ.update(server.env())
            server.create_bucket(BUCKET)
            S3Store(parse_source(f"s3://{BUCKET}/{PREFIX}")).push(folder)
            client = server.client()
            # The store's own transfer settings: what "same parts" isolates.
            parts = _transfer_config()
            seconds: dict[str, list[float]] = {"baseline": [], "same parts": [], "fleet": []}
            for _ in range(args.rounds):
                seconds["baseline"].append(timed(lambda d: baseline(client, d), scratch))
                seconds["same parts"].append(timed(lambda d: baseline(client, d, parts), scratch))
                seconds["fleet"].append(timed(fleet, scratch))
        finally:
            server.stop()

    rates = {name: model_bytes / 1e6 / statistics.median(s) for name, s in seconds.items()}
    print(f"model {MODEL}: {model_bytes / 1e6:.0f} MB, {args.rounds} alternating rounds")
    print(f"  baseline   (download_file, 8 MB parts)   {rates['baseline']:7.1f} MB/s")
    print(f"  same parts (download_file, 64 MB parts)  {rates['same parts']:7.1f} MB/s")
    print(f"  fleet      (fetch_to_cache, sha256)      {rates['fleet']:7.1f} MB/s")
    print(f"  ratio fleet / baseline:   {rates['fleet'] / rates['baseline']:.2f}")
    print(f"  ratio fleet / same parts: {rates['fleet'] / rates['same parts']:.2f}")


if __name__ == "__main__":
    main()
