#!/usr/bin/env bash
# Join, verify and install the GPU kit on the GPU machine (README, "GPU").
#
#   device_install.sh [--dry-run] PARTS_DIR [VENV]
#
# PARTS_DIR holds the parts build_kit.py made (kit.tar.xz.NN, in any subfolders) and
# kit.sha256. The parts are joined in order and checked against that digest, unpacked
# into $KIT_DIR (default /tmp/llm-fleet-kit), and every wheel is installed with pip
# --no-index --no-deps (the kit is the whole set: see infra/gpu/kit-wheels.txt) into
# VENV (default /tmp/llm-fleet-venv), a --system-site-packages venv that also sees the
# image's own site-packages when the image's python3 is itself a venv. --dry-run checks
# the parts and the digest, lists what the archive holds and prints the install steps
# without running them (build_kit.py runs it here).
set -euo pipefail
dry=0
if [[ ${1:-} == --dry-run ]]; then dry=1; shift; fi
parts_dir=${1:?usage: device_install.sh [--dry-run] PARTS_DIR [VENV]}
venv=${2:-/tmp/llm-fleet-venv}
kit_dir=${KIT_DIR:-/tmp/llm-fleet-kit}

mapfile -t parts < <(find "$parts_dir" -name 'kit.tar.xz.[0-9][0-9]' -printf '%f %p\n' | sort | cut -d' ' -f2)
sum_file=$(find "$parts_dir" -name kit.sha256 | head -n 1)
[[ ${#parts[@]} -gt 0 ]] || { echo "no kit.tar.xz.NN parts under $parts_dir"; exit 2; }
[[ -n $sum_file ]] || { echo "no kit.sha256 under $parts_dir"; exit 2; }
last=${parts[-1]##*.}
if (( 10#$last != ${#parts[@]} )); then
    echo "parts missing: ${#parts[@]} found, the last is number $last"; exit 2
fi
want=$(cut -d' ' -f1 "$sum_file")
have=$(cat "${parts[@]}" | sha256sum | cut -d' ' -f1)
[[ $want == "$have" ]] || { echo "kit digest mismatch: $have, want $want"; exit 2; }
echo "kit: ${#parts[@]} parts, sha256 $have ok"

if (( dry )); then
    listing=$(cat "${parts[@]}" | xz -d | tar -t)
    echo "wheels: $(grep -c '^kit/wheels/.*\.whl$' <<<"$listing")"
    echo "models: $(grep '^kit/models/[^/]*/config.json$' <<<"$listing" | cut -d/ -f3 | tr '\n' ' ')"
    echo "would run: mkdir -p $kit_dir && unpack into it"
    echo "would run: python3 -m venv --system-site-packages $venv (+ a .pth for the image's site-packages)"
    echo "would run: $venv/bin/python -m pip install --no-index --no-deps --no-compile $kit_dir/kit/wheels/*.whl"
    exit 0
fi

mkdir -p "$kit_dir"
cat "${parts[@]}" | xz -d -T0 | tar -x -C "$kit_dir"
python3 -m venv --system-site-packages "$venv"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# The image's python3 may be a venv itself: a venv made from it sees the base
# interpreter's packages, not that venv's. addsitedir also reads their .pth files.
python3 - "$site/_gpu_image_site.pth" <<'PY'
import site, sys
dirs = [p for p in site.getsitepackages() if p.endswith("-packages")]
with open(sys.argv[1], "w") as pth:
    pth.write("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n")
PY
"$venv/bin/python" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
    "$kit_dir"/kit/wheels/*.whl
echo "installed $(ls "$kit_dir"/kit/wheels/*.whl | wc -l) wheels into $venv"
