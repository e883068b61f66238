"""``make drain-check``: ``llm-fleet serve``'s drain, end to end, with one stream running.

Prints what ``tests/process/drain_run.py`` measures (the same run ``make test`` checks
in ``tests/process/test_shutdown.py``): what the running stream and a new request got,
how long the launcher took to exit after SIGTERM and whether any process of its tree is
left. Run it with no other Ray cluster on the machine (it starts its own, on loopback,
port 8123).

    .venv/bin/python infra/drain_check.py --grace-s 10 --tokens 60   # the stream fits
    .venv/bin/python infra/drain_check.py --grace-s 0 --tokens 200   # ended at once
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.process.drain_run import run_drain


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--grace-s", type=float, default=10.0)
    parser.add_argument("--tokens", type=int, default=60)
    options = parser.parse_args()
    run = run_drain(options.grace_s, options.tokens)
    if not run.ready:
        print(f"FAIL: not ready (log: {run.log})")
        return 1
    print(f"a new request during the drain: {run.new_request}")
    print(f"the stream running at SIGTERM: {run.stream}")
    print(f"launcher exited {run.exit_code}, {run.exit_after_s} s after SIGTERM")
    print(f"processes of its tree left: {run.left}")
    return 1 if run.left else 0


if __name__ == "__main__":
    sys.exit(main())
