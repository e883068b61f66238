"""Single-stream decode speed through llm-fleet's router against bare vLLM, same run.

Starts bare ``vllm.entrypoints.openai.api_server`` and the fleet (``serve run`` of
``serve_config.local.yaml`` narrowed to one model) on the same converted model with the
same engine settings, then alternates identical streaming requests between them, so
drift on a shared machine hits both alike. Prints medians and the ratio fleet / bare.
Never asserted in tests.

    .venv/bin/python bench/stream_throughput.py [--rounds 5] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deployments import embedded, launcher  # noqa: E402

MODEL = "smollm2-135m-instruct"
PROMPT = [{"role": "user", "content": "Write a long story about the sea."}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": 1}
    while time.monotonic() < deadline:
        try:
            if httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url} not ready")


def one_stream(url: str, max_tokens: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s after the first token) of one stream."""
    body = {
        "model": MODEL,
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    start = time.perf_counter()
    stamps: list[float] = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"]
                if delta and delta[0].get("delta", {}).get("content"):
                    stamps.append(time.perf_counter())
    ttft = stamps[0] - start
    return ttft, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    model_path = embedded.prepare(MODEL)
    config = yaml.safe_load((REPO / "serve_config.local.yaml").read_text())
    model_cfg = next(m for m in config["applications"][0]["args"]["models"] if m["id"] == MODEL)
    engine_args = model_cfg["engine_args"]
    env = {**os.environ, **model_cfg.get("env", {})}

    bare_port, fleet_port = free_port(), free_port()
    bare_cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_path), "--served-model-name", MODEL,
        "--dtype", "float32", "--enforce-eager",
        "--max-model-len", str(engine_args["max_model_len"]),
        "--max-num-seqs", str(engine_args["max_num_seqs"]),
        "--kv-cache-memory-bytes", str(engine_args["kv_cache_memory_bytes"]),
        "--host", "127.0.0.1", "--port", str(bare_port),
    ]  # fmt: skip
    config["http_options"]["port"] = fleet_port
    tmp = Path(tempfile.mkdtemp(prefix="llm-fleet-bench-"))
    config_path = tmp / "serve_config.bench.yaml"
    config_path.write_text(yaml.safe_dump(config))

    bare_log, fleet_log = (tmp / "bare.log").open("wb"), (tmp / "fleet.log").open("wb")
    bare = subprocess.Popen(bare_cmd, stdout=bare_log, stderr=bare_log, env=env)
    fleet = launcher.start(
        str(config_path), stdout=fleet_log, stderr=fleet_log, cwd=str(REPO),
        env={**env, "LLM_ALLOWED_MODELS": MODEL},
    )  # fmt: skip
    try:
        bare_url, fleet_url = f"http://127.0.0.1:{bare_port}", f"http://127.0.0.1:{fleet_port}"
        wait_ready(bare_url)
        wait_ready(fleet_url)
        results: dict[str, list[tuple[float, float]]] = {"bare vLLM": [], "llm-fleet": []}
        one_stream(bare_url, 16), one_stream(fleet_url, 16)  # warm-up
        for _ in range(args.rounds):
            results["bare vLLM"].append(one_stream(bare_url, args.max_tokens))
            results["llm-fleet"].append(one_stream(fleet_url, args.max_tokens))
    finally:
        bare.terminate()
        bare.wait(timeout=60)
        launcher.stop(fleet)

    medians = {
        name: (statistics.median(t for t, _ in runs), statistics.median(r for _, r in runs))
        for name, runs in results.items()
    }
    print(f"model {MODEL}, {args.rounds} alternating rounds of {args.max_tokens} tokens")
    for name, (ttft, rate) in medians.items():
        print(f"  {name:10s} TTFT {ttft * 1000:7.1f} ms   decode {rate:7.1f} tokens/s")
    (b_ttft, b_rate), (f_ttft, f_rate) = medians["bare vLLM"], medians["llm-fleet"]
    print(
        f"ratio llm-fleet / bare: decode tokens/s {f_rate / b_rate:.3f}, TTFT {f_ttft / b_ttft:.3f}"
    )


if __name__ == "__main__":
    main()
