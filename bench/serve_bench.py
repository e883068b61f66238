"""llm-fleet against bare vLLM, measured with vLLM's own benchmark client, same run.

Starts bare vLLM's OpenAI server (``vllm.entrypoints.openai.api_server``) and then
llm-fleet (``serve run`` of ``serve_config.local.yaml`` narrowed to one model) on the
same converted model, the same engine arguments and the same machine. The fleet is
measured through both its doors, as two sides over the same engine: the router
(``/v1``) and the model's direct path (``/m/<id>/v1``, ``router/direct.py``). Then, for
each round and each concurrency level, it runs vLLM's benchmark client
(``vllm.benchmarks.serve``, what ``vllm bench serve`` runs; its CLI entry point fails
on the CPU build, so it is called from Python) against each side in turn, the order
reversed every other round, so drift on a shared machine hits all alike. The servers
stay up for the whole run; an idle one costs next to nothing.

The dataset is vLLM's ``random`` one with fixed seeds (prompts of the same lengths):
bare vLLM and the router get the same prompts at each level, the direct door (the same
engine as the router's) prompts of its own, so no engine sees a prompt twice; streaming
chat completions with ``ignore_eos``. The table shows the median over rounds of each
figure and the ratio fleet / bare for each door. The raw results of every run go to
``.bench-results/`` (outside git) as one JSON file.

``--variant NAME:K=V,K=V`` benchmarks more fleets in the same run, one after the other,
each with those environment variables on top of the default ones (how the Ray Serve
levers were measured: see README, Performance). Never asserted in tests.

    .venv/bin/python bench/serve_bench.py                # make bench
    .venv/bin/python bench/serve_bench.py --rounds 1 --concurrency 1 32 \\
        --variant haproxy:RAY_SERVE_ENABLE_HA_PROXY=1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cpu_account import cpu_span  # noqa: E402
from llm_fleet.cli import launcher  # noqa: E402
from llm_fleet.deployments.config import ModelConfig  # noqa: E402
from llm_fleet.deployments.vllm_engine import engine_kwargs  # noqa: E402
from llm_fleet.deployments.weights import embedded  # noqa: E402

MODEL = "smollm2-135m-instruct"
LOCAL_CONFIG = REPO / "serve_config.local.yaml"
RESULTS = REPO / ".bench-results"
# vLLM's figures (ms and per-second rates) that the table and the JSON keep.
FIGURES = (
    "output_throughput",
    "request_throughput",
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_itl_ms",
    "median_e2el_ms",
)
COLUMNS = (
    ("output_throughput", "out tok/s", "higher"),
    ("request_throughput", "req/s", "higher"),
    ("median_ttft_ms", "TTFT p50", "lower"),
    ("p99_ttft_ms", "TTFT p99", "lower"),
    ("median_itl_ms", "ITL p50", "lower"),
    ("median_e2el_ms", "E2E p50", "lower"),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(
    url: str, process: subprocess.Popen[bytes], model: str = MODEL, timeout: float = 900
) -> None:
    """Until ``url`` answers a one-token chat (or the server exits)."""
    deadline = time.monotonic() + timeout
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).status_code == 200:
                return
        time.sleep(2)
    raise TimeoutError(f"{url} not ready in {timeout:.0f} s")


@dataclass
class Side:
    """One server under test and its results: {concurrency: [figures per round]}."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    results: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    # Added to the dataset seed: a side sharing an engine with another (the fleet's two
    # doors) must not send it the prompts it just cached.
    seed_offset: int = 0


def model_settings(
    config_path: Path = LOCAL_CONFIG, model_id: str = MODEL
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config narrowed to the benchmarked model, and that model's entry.

    The model runs exactly one replica, like bare vLLM's one engine: autoscaling a
    second CPU engine onto the same cores would measure the machine, not the gateway.
    """
    config = yaml.safe_load(config_path.read_text())
    app = config["applications"][0]
    model = next(m for m in app["args"]["models"] if m["id"] == model_id)
    model["autoscaling"] = {**model.get("autoscaling", {}), "min_replicas": 1, "max_replicas": 1}
    if not model.get("direct"):
        raise RuntimeError(f"{model_id} must keep direct: true in {config_path.name}")
    for each in config["applications"]:  # the fleet app and the model's direct app
        each["args"]["models"] = [model]
    return config, model


def bare_command(model_path: Path, model: Mapping[str, Any], port: int) -> list[str]:
    """vLLM's own OpenAI server with the fleet's engine arguments for this model: the
    same ``engine_kwargs`` the replica gives vLLM (CPU defaults for a CPU model)."""
    entry = ModelConfig.model_validate(model)
    kwargs = engine_kwargs(entry, model_path)
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    for key, value in kwargs.items():
        flag = f"--{key.replace('_', '-')}"
        if key == "served_model_name":
            argv += [flag, *value]
        elif value is True:
            argv.append(flag)
        elif value is False:  # vLLM's booleans: store_true ones, or --no-<name>
            if key not in ("trust_remote_code", "enforce_eager"):
                argv.append(f"--no-{key.replace('_', '-')}")
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def run_client(
    url: str, tokenizer: Path, concurrency: int, seed: int, args: argparse.Namespace
) -> dict:
    """One level of ``vllm bench serve`` against ``url``; vLLM's result dict.

    ``seed`` picks the random prompts. No engine sees a seed twice: vLLM caches prompt
    prefixes, and a repeated prompt would measure that cache instead of the server.
    """
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    prompts = max(args.min_prompts, concurrency * args.prompts_per_slot)
    argv = [
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
        "--base-url", url, "--model", args.model, "--tokenizer", str(tokenizer),
        "--dataset-name", "random", "--seed", str(seed),
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
        "--ignore-eos", "--temperature", "0",
        "--percentile-metrics", "ttft,itl,e2el", "--metric-percentiles", "50,99",
        "--disable-tqdm", "--num-warmups", str(concurrency),
    ]  # fmt: skip
    with contextlib.redirect_stdout(sys.stderr):  # vLLM's own report: keep stdout for ours
        result: dict = main(parser.parse_args(argv))
    if result.get("completed", 0) != prompts:
        raise RuntimeError(f"{url}: {result.get('completed')} of {prompts} requests completed")
    return {name: float(result[name]) for name in FIGURES}


def serve_status(env: Mapping[str, str]) -> str:
    """``serve status`` of the running fleet (its output, or why it failed).

    The CLI sends the cluster's token (``~/.ray/auth_token``) only in token mode, which
    it does not infer by itself: hence ``RAY_AUTH_MODE=token``, unless set otherwise."""
    done = subprocess.run(
        [launcher._bin("serve"), "status"],
        env=launcher.local_cluster_env({"RAY_AUTH_MODE": "token", **env}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    failed = f"\n(exit {done.returncode}) {done.stderr[-2000:]}" if done.returncode else ""
    return done.stdout + failed


def model_path_of(model: Mapping[str, Any]) -> Path:
    """The folder vLLM loads: an embedded model converted once, or a local folder."""
    source = str(model["source"])
    if source.startswith("embedded://"):
        return embedded.prepare(source.removeprefix("embedded://"))
    if source.startswith(("/", "file://")):
        return Path(source.removeprefix("file://"))
    raise RuntimeError(f"bench: {source}: only embedded:// and local sources are benchmarked")


def hardware() -> str:
    """The machine, in words: its GPU when torch sees one, then its CPUs."""
    cpus = f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})"
    import torch

    return f"{torch.cuda.get_device_name(0)}, {cpus}" if torch.cuda.is_available() else cpus


def median_figures(runs: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.median(run[name] for run in runs) for name in FIGURES}


def print_table(bare: Side, fleets: list[Side]) -> None:
    """Per fleet and level: the medians of each side over the rounds they shared, and
    the median of the per-round ratios (a round's two runs are back to back, so drift
    of the machine cancels in each ratio)."""
    header = f"{'side':18s} {'conc':>4s} " + " ".join(f"{title:>10s}" for _, title, _ in COLUMNS)
    print(header)
    for fleet in fleets:
        for level, runs in sorted(fleet.results.items()):
            bare_runs = {run["pair"]: run for run in bare.results[level]}
            base_runs = [bare_runs[run["pair"]] for run in runs]
            base, mine = median_figures(base_runs), median_figures(runs)
            ratios = {
                name: statistics.median(
                    f[name] / b[name] for b, f in zip(base_runs, runs, strict=True)
                )
                for name in FIGURES
            }
            for label, row, fmt in (
                (bare.name, base, "10.2f"),
                (fleet.name, mine, "10.2f"),
                ("  ratio fleet/bare", ratios, "10.3f"),
            ):
                cells = " ".join(format(row[name], fmt) for name, _, _ in COLUMNS)
                print(f"{label:18s} {level:4d} {cells}")


def print_cpu(sides: list[Side]) -> None:
    """Cores busy per kind of process (CPU seconds / wall seconds), medians over rounds."""
    print("cores busy by process kind (CPU s / wall s)")
    for side in sides:
        for level, runs in sorted(side.results.items()):
            if side.name == "bare vLLM":  # the rounds of the first fleet only
                pairs = {run["pair"] for run in sides[1].results[level]}
                runs = [run for run in runs if run["pair"] in pairs]
            kinds = sorted({k for run in runs for k in run["cpu_s"]})
            shares = {
                k: statistics.median(run["cpu_s"].get(k, 0.0) / run["wall_s"] for run in runs)
                for k in kinds
            }
            busy = ", ".join(
                f"{k} {v:.2f}"
                for k, v in sorted(shares.items(), key=lambda kv: -kv[1])
                if v >= 0.01
            )
            print(f"  {side.name:16s} c={level:<3d} total {sum(shares.values()):.2f}: {busy}")


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``NAME:K=V,K=V``: environment variables; where K has a dot, a config edit: app
    args (``streaming.handle_transport=grpc``, ``model.max_ongoing_requests=32``) or,
    under ``app.``, the Serve application (``app.logging_config.enable_access_log=false``).
    """
    name, _, assignments = text.partition(":")
    return name, dict(item.split("=", 1) for item in assignments.split(",") if item)


def apply_variant(
    config: dict[str, Any], settings: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """A copy of ``config`` with the variant's args edits, and its env variables."""
    config = json.loads(json.dumps(config))
    env = {}
    for key, value in settings.items():
        if "." not in key:
            env[key] = value
            continue
        *path, field_name = key.split(".")
        # Every llm-fleet app: the fleet's and the direct app (whose args are the fleet's).
        for app in config["applications"]:
            if "models" not in app.get("args", {}):
                continue
            args = app["args"]
            if path[0] == "app":
                target = app
            elif path[0] == "model":
                target = args["models"][0]
            else:
                target = args.setdefault(path[0], {})
            for part in path[1:]:
                target = target.setdefault(part, {})
            target[field_name] = yaml.safe_load(value)
    return config, env


@contextlib.contextmanager
def fleet_server(
    config: dict[str, Any],
    env: Mapping[str, str],
    tmp: Path,
    name: str,
    model: str = MODEL,
    status_to: Path | None = None,
) -> Iterator[tuple[Side, Side]]:
    """One fleet, measured through both doors: the router and the model's direct path.
    With ``status_to``, ``serve status`` is written there once the measuring is done."""
    port = free_port()
    config = {**config, "http_options": {**config["http_options"], "port": port}}
    path = tmp / f"serve_config.{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (tmp / f"fleet-{name}.log").open("wb")
    process = launcher.start(str(path), stdout=log, stderr=log, cwd=str(REPO), env=env)
    base = f"http://127.0.0.1:{port}"
    routed = Side(name, base, process)
    direct = Side(f"{name} direct", f"{base}/m/{model}", process, seed_offset=50)
    try:
        wait_ready(routed.url, process, model)
        wait_ready(direct.url, process, model)
        yield routed, direct
        if status_to is not None:
            status_to.write_text(serve_status(env))
    finally:
        launcher.stop(process)
        log.close()


def measure(
    sides: list[Side],
    tokenizer: Path,
    args: argparse.Namespace,
    round_no: int,
    first_seed: int,
    variant: int,
    progress: Callable[[], None] = lambda: None,
) -> None:
    """One round: every level, every side, the side order alternating by round;
    ``progress`` after each run (the caller saves what was measured so far)."""
    order = sides if round_no % 2 == 0 else list(reversed(sides))
    for number, level in enumerate(args.concurrency):
        pair = f"{variant}/{round_no}"
        for side in order:
            started = time.perf_counter()
            with cpu_span([side.process.pid]) as cpu:
                seed = first_seed + number + side.seed_offset
                figures: dict[str, Any] = run_client(side.url, tokenizer, level, seed, args)
            figures["wall_s"] = time.perf_counter() - started
            figures["cpu_s"] = dict(cpu)
            figures["pair"] = pair  # the bare run of the same round and level has it too
            side.results.setdefault(level, []).append(figures)
            progress()
            print(
                f"round {round_no} {side.name:14s} c={level:<3d} "
                f"{figures['output_throughput']:7.2f} tok/s "
                f"TTFT p50 {figures['median_ttft_ms']:8.1f} ms",
                file=sys.stderr,
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--prompts-per-slot", type=int, default=2, help="prompts = c * this")
    parser.add_argument("--min-prompts", type=int, default=8)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:K=V,...")
    parser.add_argument("--no-default-fleet", action="store_true")
    parser.add_argument("--config", type=Path, default=LOCAL_CONFIG, help="serve config")
    parser.add_argument("--model", default=MODEL, help="the config's model to measure")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--status-to", type=Path, help="write the first fleet's serve status")
    args = parser.parse_args()

    config, model_cfg = model_settings(args.config, args.model)
    model_path = model_path_of(model_cfg)
    base_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    variants = [] if args.no_default_fleet else [("llm-fleet", {})]
    variants += [parse_variant(v) for v in args.variant]
    tmp = Path(tempfile.mkdtemp(prefix="llm-fleet-bench-"))
    started = time.time()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / time.strftime("serve-%Y%m%d-%H%M%S.json", time.localtime(started))

    bare_log = (tmp / "bare.log").open("wb")
    port = free_port()
    bare_process = subprocess.Popen(
        bare_command(model_path, model_cfg, port),
        stdout=bare_log,
        stderr=bare_log,
        env={**base_env, **model_cfg.get("env", {})},
    )
    bare = Side("bare vLLM", f"http://127.0.0.1:{port}", bare_process)
    fleets: list[Side] = []

    def save() -> None:  # after every run: a benchmark cut short keeps what it measured
        record = {
            "model": args.model,
            "hardware": hardware(),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "engine_args": model_cfg.get("engine_args", {}),
            "variants": {name: env for name, env in variants},
            "bare": bare.results,
            "fleets": {f.name: f.results for f in fleets},
            "logs": str(tmp),
        }
        out.write_text(json.dumps(record, indent=2))

    try:
        wait_ready(bare.url, bare_process, args.model)
        for number, (name, settings) in enumerate(variants):
            variant_config, env = apply_variant(config, settings)
            status_to = args.status_to if number == 0 else None
            with fleet_server(
                variant_config, {**base_env, **env}, tmp, name, args.model, status_to
            ) as doors:
                fleets += doors
                for round_no in range(args.rounds):
                    seed = 1000 * number + 100 * round_no
                    measure([bare, *doors], model_path, args, round_no, seed, number, save)
    finally:
        bare_process.terminate()
        bare_process.wait(timeout=60)
        bare_log.close()

    print(
        f"model {args.model} on {hardware()}, "
        f"random dataset {args.input_len} in / {args.output_len} out, ignore_eos, "
        f"{args.rounds} alternating rounds, medians; logs in {tmp}"
    )
    print_table(bare, fleets)
    print_cpu([bare, *fleets])
    save()
    print(f"raw results: {out}")


if __name__ == "__main__":
    main()
