"""Build the GPU kit: what the offline GPU machine needs to run llm-fleet on vLLM 0.26.

``make gpu-kit`` (``python infra/gpu/build_kit.py``) makes, in ``.gpukit/`` (ignored by
git):

- ``wheels/``: the wheels of ``kit-wheels.txt`` for CPython 3.12 on manylinux x86_64,
  downloaded once, one version each (pip ``--no-deps``: the list is the whole set);
- ``kit/``: those wheels rewritten with their entries stored, not deflated (xz then
  compresses the whole kit about a third better), vLLM's and Ray's trimmed of the
  kernels and files this path never loads (``TRIM``), plus ``models/<id>/``: the
  config and tokenizer of a model of a real 7-8B shape for vLLM's ``load_format:
  dummy`` (random weights, nothing to download);
- ``carry/pNN/kit.tar.xz.NN``: ``kit/`` as one ``tar.xz``, split into numbered parts
  of at most ``PART_MIB`` MiB, one folder per device call (a call carries at most 64
  MiB with the repository), and ``carry/pNN/kit.sha256`` in the last one.

Then it checks the kit: every part under the limit, one version per distribution,
every requirement of every carried wheel either carried, on the GPU image
(``image-packages.txt``) or named with its reason in ``kit-skipped.txt``, pip's dry run
of the install for Python 3.12 on manylinux x86_64, and ``device_install.sh --dry-run``
on the joined parts. ``device_install.sh`` installs it on the device;
``gpu_check.py`` runs the check there. See README, "GPU".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
KIT = REPO / ".gpukit"
PART_MIB = 60
PYTHON_VERSION = "3.12"
PLATFORMS = (
    "manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64",
    "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64",
)  # fmt: skip
# Entries of a wheel this path never loads: (distribution, path prefixes). Why each
# can go: ../../../shared/gpu-kit-vllm-0.26.md, section 4, and README, "GPU".
TRIM: dict[str, tuple[str, ...]] = {
    "vllm": (
        "vllm/vllm_flash_attn/_vllm_fa2_C",  # FA2: Hopper uses FA3 (kept)
        "vllm/_moe_C_stable_libtorch",  # MoE ops; imported under suppress(ImportError)
        "vllm/vllm-rs",  # only with VLLM_USE_RUST_FRONTEND=1
        "vllm/third_party/deep_gemm/",  # FP8 GEMMs; found with find_spec
        "vllm/third_party/fmha_sm100/",  # Blackwell attention
        "vllm/_flashmla_C",  # MLA models; guarded import
        "vllm/_qutlass_C",  # FP4 quantization; guarded import
    ),
    "ray": ("ray/jars/",),  # Java workers; the raylet skips Java without the folder
}
# A model of Llama-3.1-8B's shape (7.4B parameters with this vocabulary): the
# tokenizer is the embedded SmolLM2's (49152 tokens), so the vocabulary matches it.
DUMMY_MODEL_ID = "llama-3.1-8b-shape"
DUMMY_MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "vocab_size": 49152,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
_REQ_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_list(path: Path) -> list[str]:
    """The non-comment lines of a list file, stripped."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def wheel_name(path: Path) -> str:
    return canonical(path.name.split("-", 1)[0])


def download(pins: list[str], dest: Path) -> None:
    """pip download each pin for CPython 3.12 on manylinux x86_64 (skipped if present)."""
    have = {wheel_name(p) for p in dest.glob("*.whl")}
    missing = [pin for pin in pins if canonical(pin.split("==")[0]) not in have]
    if not missing:
        return
    dest.mkdir(parents=True, exist_ok=True)
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "-q", "--no-deps",
            "--only-binary=:all:", "--python-version", PYTHON_VERSION,
            "--implementation", "cp", *platform_args, "--platform", "any",
            "-d", str(dest), *missing,
        ],
        check=True,
    )  # fmt: skip


def trimmed(names: Iterable[str], prefixes: tuple[str, ...]) -> set[str]:
    """The entries of ``names`` that start with one of ``prefixes``."""
    return {name for name in names if name.startswith(prefixes)} if prefixes else set()


def repack(src: Path, dest: Path, drop: tuple[str, ...] = ()) -> list[str]:
    """Copy wheel ``src`` to ``dest`` with every entry stored, without the entries under
    ``drop`` and their RECORD lines. Returns the dropped entries."""
    with zipfile.ZipFile(src) as zin:
        names = zin.namelist()
        gone = trimmed(names, drop)
        if drop and not gone:
            raise RuntimeError(f"{src.name}: nothing under {drop}: the wheel's layout changed")
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zout:
            for info in zin.infolist():
                if info.filename in gone:
                    continue
                data = zin.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    kept = [
                        line
                        for line in data.decode().splitlines()
                        if line.split(",", 1)[0] not in gone
                    ]
                    data = ("\n".join(kept) + "\n").encode()
                info.compress_type = zipfile.ZIP_STORED
                zout.writestr(info, data)
    return sorted(gone)


def requirements(wheel: Path) -> list[tuple[str, str]]:
    """(distribution, full requirement) for each Requires-Dist that applies to CPython
    3.12 on Linux without extras."""
    from packaging.markers import Marker

    environment = {
        "python_version": PYTHON_VERSION,
        "python_full_version": f"{PYTHON_VERSION}.3",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }
    with zipfile.ZipFile(wheel) as zin:
        meta = next(n for n in zin.namelist() if n.endswith(".dist-info/METADATA"))
        text = zin.read(meta).decode()
    found = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = line.split(":", 1)[1].strip()
        spec, _, marker = requirement.partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate(environment):
            continue
        match = _REQ_NAME.match(spec)
        if match:
            found.append((canonical(match.group(1)), requirement))
    return found


@dataclass
class Unmet:
    wheel: str
    requirement: str


def unmet_requirements(wheels: list[Path], image: set[str], skipped: set[str]) -> Iterator[Unmet]:
    """Requirements no carried wheel, image package or reasoned skip covers."""
    carried = {wheel_name(w) for w in wheels}
    for wheel in wheels:
        for name, requirement in requirements(wheel):
            if name not in carried | image | skipped:
                yield Unmet(wheel.name, requirement)


def one_version_each(wheels: list[Path]) -> list[str]:
    seen: dict[str, str] = {}
    doubles = []
    for wheel in wheels:
        name = wheel_name(wheel)
        if name in seen:
            doubles.append(f"{seen[name]} and {wheel.name}")
        seen[name] = wheel.name
    return doubles


def split(archive: Path, carry: Path, part_bytes: int) -> list[Path]:
    """``archive`` cut into ``carry/pNN/<name>.NN`` parts of at most ``part_bytes``."""
    shutil.rmtree(carry, ignore_errors=True)
    parts = []
    with archive.open("rb") as src:
        number = 0
        while chunk := src.read(part_bytes):
            number += 1
            folder = carry / f"p{number:02d}"
            folder.mkdir(parents=True)
            part = folder / f"{archive.name}.{number:02d}"
            part.write_bytes(chunk)
            parts.append(part)
    return parts


def stage_model(stage: Path, tokenizer_dir: Path) -> Path:
    folder = stage / "models" / DUMMY_MODEL_ID
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(DUMMY_MODEL_CONFIG, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        source = tokenizer_dir / name
        if source.exists():
            shutil.copy2(source, folder / name)
    if not (folder / "tokenizer.json").exists():
        raise RuntimeError(f"no tokenizer.json in {tokenizer_dir}")
    return folder


def build(args: argparse.Namespace) -> int:
    pins = read_list(HERE / "kit-wheels.txt")
    download(pins, KIT / "wheels")
    wheels = sorted((KIT / "wheels").glob("*.whl"))
    wanted = {canonical(pin.split("==")[0]) for pin in pins}
    wheels = [w for w in wheels if wheel_name(w) in wanted]
    if len(wheels) != len(wanted):
        missing = wanted - {wheel_name(w) for w in wheels}
        raise RuntimeError(f"not downloaded: {sorted(missing)}")

    stage = KIT / "kit"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "wheels").mkdir(parents=True)
    for wheel in wheels:
        gone = repack(wheel, stage / "wheels" / wheel.name, TRIM.get(wheel_name(wheel), ()))
        if gone:
            print(f"{wheel.name}: {len(gone)} entries trimmed")
    from llm_fleet.deployments.weights import embedded
    from llm_fleet.deployments.weights.integrity import file_digest

    stage_model(stage, embedded.prepare("smollm2-135m-instruct"))

    archive = KIT / "kit.tar.xz"
    with archive.open("wb") as packed:  # xz's own threads: Python's lzma uses one core
        tar = subprocess.Popen(["tar", "-C", str(KIT), "-cf", "-", "kit"], stdout=subprocess.PIPE)
        subprocess.run(
            ["xz", "-T0", f"-{args.preset}"], stdin=tar.stdout, stdout=packed, check=True
        )
        if tar.wait():
            raise RuntimeError("tar failed")
    parts = split(archive, KIT / "carry", PART_MIB << 20)
    (parts[-1].parent / "kit.sha256").write_text(
        f"{file_digest(archive, 'sha256')}  {archive.name}\n"
    )
    archive.unlink()
    return check(parts)


def check(parts: list[Path]) -> int:
    """The kit's checks (see the module docstring); 0 when all pass."""
    problems = []
    for part in parts:
        size = part.stat().st_size
        if size > PART_MIB << 20:
            problems.append(f"{part.name}: {size} bytes, over {PART_MIB} MiB")
    wheels = sorted((KIT / "kit" / "wheels").glob("*.whl"))
    problems += [f"two versions: {pair}" for pair in one_version_each(wheels)]
    image = {canonical(n) for n in read_list(HERE / "image-packages.txt")}
    skipped = {canonical(n.split()[0]) for n in read_list(HERE / "kit-skipped.txt")}
    problems += [f"{u.wheel}: {u.requirement}" for u in unmet_requirements(wheels, image, skipped)]
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    dry = subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--dry-run", "-q", "--no-index",
            "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
            "--implementation", "cp", *platform_args, "--platform", "any",
            "--target", str(KIT / "dry-target"), *map(str, wheels),
        ],
        capture_output=True, text=True,
    )  # fmt: skip
    if dry.returncode:
        problems.append(f"pip dry run: {dry.stderr.strip()[-2000:]}")
    installer = subprocess.run(
        ["bash", str(HERE / "device_install.sh"), "--dry-run", str(KIT / "carry")],
        capture_output=True, text=True,
    )  # fmt: skip
    if installer.returncode:
        problems.append(f"device_install.sh --dry-run: {installer.stdout[-1500:]}")
    total = sum(p.stat().st_size for p in parts)
    print(f"{len(wheels)} wheels; {len(parts)} parts, {total / 2**20:.1f} MiB in all:")
    for part in parts:
        print(f"  {part.relative_to(REPO)}  {part.stat().st_size / 2**20:.1f} MiB")
    print(installer.stdout.strip()[-1500:])
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", type=int, default=6, help="xz preset (0-9)")
    parser.add_argument("--check-only", action="store_true", help="check a built kit")
    args = parser.parse_args()
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    if args.check_only:
        return check(sorted((KIT / "carry").glob("p*/kit.tar.xz.*")))
    return build(args)


if __name__ == "__main__":
    sys.exit(main())
