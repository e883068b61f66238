"""``llm-fleet weights push|pull|verify``: staging and checking weights for operators.

Exit codes: 0 done; 1 the store failed, a checksum did not match or a file is
missing; 2 usage (bad arguments, a source that is not cached for ``verify``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from llm_fleet.deployments.errors import ConfigError, ModelPreparationError
from llm_fleet.deployments.weights import embedded, store_for
from llm_fleet.deployments.weights.cache import (
    LoadPolicy,
    Progress,
    cache_root,
    fetch_to_cache,
    is_complete,
    recorded_digests,
)
from llm_fleet.deployments.weights.integrity import MANIFEST_NAME, parse_manifest, verify_file
from llm_fleet.deployments.weights.sources import parse_source

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class BarProgress(Progress):
    """Progress that also draws a terminal progress bar."""

    def __init__(self, label: str, total: int):
        from tqdm import tqdm

        super().__init__(label, total)
        self._bar = tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr)

    def advance(self, count: int) -> None:
        super().advance(count)
        self._bar.update(count)

    def close(self) -> None:
        """End the bar's line, so what is printed next starts on a line of its own."""
        self._bar.close()


def _local_folder(what: str) -> Path:
    if what in embedded.EMBEDDED_MODELS:
        return embedded.prepare(what)
    folder = Path(what)
    if not folder.is_dir():
        raise ConfigError(f"{what} is neither an embedded model id nor a folder")
    return folder


def _push(options: argparse.Namespace) -> int:
    from llm_fleet.deployments.weights.s3_store import S3Store

    source = parse_source(options.dest)
    if source.scheme != "s3":
        raise ConfigError("push writes to s3://bucket/prefix destinations")
    folder = _local_folder(options.what)
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    bar = BarProgress(f"push {source}", total)
    try:
        names = S3Store(source).push(folder, on_bytes=bar.advance)
    finally:
        bar.close()
    print(f"pushed {len(names)} files and {MANIFEST_NAME} to {source}")
    return EXIT_OK


def _pull(options: argparse.Namespace) -> int:
    source = parse_source(options.source)
    if source.scheme not in ("s3", "hf"):
        raise ConfigError("pull takes an s3:// or hf:// source")
    policy = LoadPolicy(allow_pickle=options.allow_pickle, require_checksums=True)
    bars: list[BarProgress] = []

    def bar(label: str, total: int) -> Progress:
        bars.append(BarProgress(label, total))
        return bars[-1]

    try:
        folder = fetch_to_cache(store_for(source), source.cache_key(), policy, None, bar)
    finally:
        for opened in bars:
            opened.close()
    print(folder)
    return EXIT_OK


def _verify_folder(folder: Path) -> int:
    if is_complete(folder):
        expected = recorded_digests(folder)
    elif (folder / MANIFEST_NAME).is_file():
        expected = dict(parse_manifest((folder / MANIFEST_NAME).read_text()))
    else:
        raise ConfigError(f"{folder} has neither a cache marker nor {MANIFEST_NAME}")
    for name, digest in sorted(expected.items()):
        if not (folder / name).is_file():
            raise ModelPreparationError(f"missing file {name} in {folder}")
        if digest is not None:
            verify_file(folder / name, digest, name)
    print(f"{folder}: {len(expected)} files verified")
    return EXIT_OK


def _verify(options: argparse.Namespace) -> int:
    target = options.target
    if Path(target).is_dir():
        return _verify_folder(Path(target))
    source = parse_source(target)
    folder = cache_root() / source.cache_key()
    if not is_complete(folder):
        raise ConfigError(f"{source} is not in this node's cache ({folder}); pull it first")
    return _verify_folder(folder)


def add_parser(commands: Any) -> None:
    weights = commands.add_parser("weights", help="stage, pre-warm and verify weights")
    sub = weights.add_subparsers(dest="weights_command", required=True)
    push = sub.add_parser("push", help="upload a folder or embedded model to S3 with a manifest")
    push.add_argument("what", metavar="DIR|EMBEDDED_ID")
    push.add_argument("dest", metavar="s3://bucket/prefix")
    push.set_defaults(handler=run(_push))
    pull = sub.add_parser("pull", help="download a source into this node's cache")
    pull.add_argument("source")
    pull.add_argument("--allow-pickle", action="store_true")
    pull.set_defaults(handler=run(_pull))
    verify = sub.add_parser("verify", help="re-check a cached source or a folder")
    verify.add_argument("target", metavar="SOURCE|DIR")
    verify.set_defaults(handler=run(_verify))


def run(command: Any) -> Any:
    """Map the errors of a weights command to its exit codes and one stderr line."""

    def handler(options: argparse.Namespace) -> int:
        try:
            code: int = command(options)
        except ConfigError as exc:
            print(f"llm-fleet weights: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except ModelPreparationError as exc:
            print(f"llm-fleet weights: {exc}", file=sys.stderr)
            return EXIT_FAILED
        return code

    return handler
