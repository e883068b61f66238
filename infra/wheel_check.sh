#!/usr/bin/env bash
# The wheel, installed alone into a fresh venv beside the CPU stack, serves a chat.
#
#   make wheel-check        (after make install; about 3 minutes)
#
# 1. `pip wheel .` builds llm-fleet's wheel (no dependencies).
# 2. A fresh venv gets that wheel and nothing else of ours; the CPU stack (vLLM, Ray,
#    torch) comes from the project venv through a path entry, not from this checkout:
#    the project venv's editable install of llm_fleet is a .pth hook there, which a
#    path entry does not run, so `llm_fleet` can only come from the wheel (checked).
# 3. From an empty folder outside the checkout, `llm-fleet serve` (the wheel's entry
#    point; it runs `serve run`) serves serve_config.local.yaml with one model
#    (LLM_ALLOWED_MODELS), a chat request is answered, and the launcher stops it all.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
STACK_PY="${STACK_PY:-$REPO/.venv/bin/python}"
MODEL="${MODEL:-smollm2-135m-instruct}"
PORT="${PORT:-8000}"
WORK="$(mktemp -d /tmp/llm-fleet-wheel-check.XXXXXX)"
SERVER_PID=""

finish() {
	if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
		kill -INT "$SERVER_PID" 2>/dev/null || true
		for _ in $(seq 60); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
		kill -0 "$SERVER_PID" 2>/dev/null && kill -INT "$SERVER_PID" 2>/dev/null
		wait "$SERVER_PID" 2>/dev/null || true
	fi
	rm -rf "$WORK"
}
trap finish EXIT

echo "== building the wheel"
"$STACK_PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$REPO"
WHEEL="$(ls "$WORK"/dist/llm_fleet-*.whl)"
unzip -p "$WHEEL" '*.dist-info/top_level.txt'

echo "== a fresh venv with the wheel alone"
"$STACK_PY" -m venv "$WORK/venv"
VENV_PY="$WORK/venv/bin/python"
STACK_SITE="$("$STACK_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
VENV_SITE="$("$VENV_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$STACK_SITE" >"$VENV_SITE/cpu-stack.pth"
"$VENV_PY" -m pip install -q --no-deps --no-index "$WHEEL"
# Ray's `serve` command, as pip writes console scripts (the stack's own is in its venv).
printf '#!%s\nimport sys\nfrom ray.serve.scripts import cli\nsys.exit(cli())\n' "$VENV_PY" \
	>"$WORK/venv/bin/serve"
chmod +x "$WORK/venv/bin/serve"

mkdir "$WORK/run"
cp "$REPO/serve_config.local.yaml" "$WORK/run/"
cd "$WORK/run"
FROM="$("$VENV_PY" -c 'import llm_fleet.router.builder as b; print(b.__file__)')"
echo "llm_fleet.router.builder from $FROM"
[[ "$FROM" == "$VENV_SITE"/* ]] || { echo "FAIL: llm_fleet is not the wheel's"; exit 1; }

echo "== llm-fleet serve serve_config.local.yaml (model $MODEL)"
LLM_ALLOWED_MODELS="$MODEL" "$WORK/venv/bin/llm-fleet" serve serve_config.local.yaml \
	>"$WORK/serve.log" 2>&1 &
SERVER_PID=$!

"$STACK_PY" - "$PORT" "$MODEL" "$SERVER_PID" <<'EOF'
import sys
import time

import httpx
import openai
import psutil

port, model, pid = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
deadline = time.monotonic() + 600
while True:
    if not psutil.pid_exists(pid):
        sys.exit("FAIL: llm-fleet serve exited before it was ready")
    try:
        if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    if time.monotonic() > deadline:
        sys.exit("FAIL: not ready in 600 s")
    time.sleep(2)
client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
reply = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=24,
    temperature=0,
)
text = reply.choices[0].message.content or ""
print(f"chat answer: {text!r} ({reply.usage.completion_tokens} tokens)")
if "Paris" not in text:
    sys.exit("FAIL: the answer does not name Paris")
EOF

echo "== stopping"
kill -INT "$SERVER_PID"
for _ in $(seq 90); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
if kill -0 "$SERVER_PID" 2>/dev/null; then
	echo "FAIL: llm-fleet serve did not stop within 90 s"
	exit 1
fi
wait "$SERVER_PID" || true
SERVER_PID=""
echo "PASS: the wheel alone, in a fresh venv, served a chat through serve run"
