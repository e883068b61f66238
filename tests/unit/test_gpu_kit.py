"""The GPU kit's builder and installer (infra/gpu/), on small stand-in wheels.

The real kit (``make gpu-kit``) downloads ~400 MB, so it is not built here; these tests
pin what each step must do to any wheel: trimming, the requirement check, splitting,
and the device installer's checks of the joined parts.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "infra" / "gpu"))

import build_kit  # noqa: E402


def _wheel(path: Path, files: dict[str, bytes], requires: list[str] = ()) -> Path:  # type: ignore[assignment]
    dist = path.name.split("-")[0] + "-1.0.dist-info"
    meta = "Metadata-Version: 2.1\nName: x\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    record = "".join(f"{name},sha256=x,1\n" for name in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as whl:
        for name, data in files.items():
            whl.writestr(name, data)
        whl.writestr(f"{dist}/METADATA", meta)
        whl.writestr(f"{dist}/RECORD", record)
    return path


def test_repack_drops_the_trimmed_entries_and_their_record_lines(tmp_path: Path) -> None:
    src = _wheel(
        tmp_path / "vllm-1.0-py3-none-any.whl",
        {"vllm/_fa2_C.so": b"k" * 100, "vllm/keep.py": b"print(1)", "vllm/third/x.h": b"h"},
    )
    dest = tmp_path / "out.whl"
    gone = build_kit.repack(src, dest, ("vllm/_fa2_C", "vllm/third/"))
    assert gone == ["vllm/_fa2_C.so", "vllm/third/x.h"]
    with zipfile.ZipFile(dest) as whl:
        assert sorted(whl.namelist()) == [
            "vllm-1.0.dist-info/METADATA",
            "vllm-1.0.dist-info/RECORD",
            "vllm/keep.py",
        ]
        assert {info.compress_type for info in whl.infolist()} == {zipfile.ZIP_STORED}
        record = whl.read("vllm-1.0.dist-info/RECORD").decode()
    assert "vllm/keep.py," in record and "_fa2_C" not in record and "third" not in record


def test_a_trim_that_matches_nothing_fails_loudly(tmp_path: Path) -> None:
    src = _wheel(tmp_path / "ray-1.0-py3-none-any.whl", {"ray/a.py": b""})
    with pytest.raises(RuntimeError, match="layout changed"):
        build_kit.repack(src, tmp_path / "out.whl", ("ray/jars/",))


def test_requirements_follow_markers_for_cpython_312_on_linux(tmp_path: Path) -> None:
    wheel = _wheel(
        tmp_path / "pkg-1.0-py3-none-any.whl",
        {},
        [
            "carried>=1",
            "on-image",
            "skipped-one",
            "missing_dep (>=2)",
            'old-only; python_version < "3.8"',
            'windows-only; sys_platform == "win32"',
            'extra-only; extra == "gpu"',
        ],
    )
    other = _wheel(tmp_path / "carried-1.0-py3-none-any.whl", {})
    unmet = list(build_kit.unmet_requirements([wheel, other], {"on-image"}, {"skipped-one"}))
    assert [u.requirement for u in unmet] == ["missing_dep (>=2)"]


def test_one_version_each(tmp_path: Path) -> None:
    wheels = [tmp_path / "a_b-1.0-py3-none-any.whl", tmp_path / "a.b-2.0-py3-none-any.whl"]
    assert build_kit.one_version_each(wheels) == [f"{wheels[0].name} and {wheels[1].name}"]


def test_the_lists_are_pinned_and_reasoned() -> None:
    pins = build_kit.read_list(REPO / "infra" / "gpu" / "kit-wheels.txt")
    assert pins and all("==" in pin for pin in pins)
    names = [build_kit.canonical(pin.split("==")[0]) for pin in pins]
    assert len(names) == len(set(names))
    for line in (REPO / "infra" / "gpu" / "kit-skipped.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert "#" in line and line.split("#", 1)[1].strip(), f"no reason: {line}"


def _kit(tmp_path: Path, part_bytes: int) -> tuple[Path, list[Path]]:
    stage = tmp_path / "stage" / "kit"
    (stage / "wheels").mkdir(parents=True)
    (stage / "models" / "m").mkdir(parents=True)
    (stage / "models" / "m" / "config.json").write_text("{}")
    _wheel(stage / "wheels" / "one-1.0-py3-none-any.whl", {"one/x.bin": os.urandom(4096)})
    archive = tmp_path / "kit.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(stage, arcname="kit")
    parts = build_kit.split(archive, tmp_path / "carry", part_bytes)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    (parts[-1].parent / "kit.sha256").write_text(f"{digest}  kit.tar.xz\n")
    return archive, parts


def _dry_run(carry: Path) -> subprocess.CompletedProcess[str]:
    script = REPO / "infra" / "gpu" / "device_install.sh"
    return subprocess.run(
        ["bash", str(script), "--dry-run", str(carry)], capture_output=True, text=True
    )


def test_split_parts_join_back_and_the_installer_checks_them(tmp_path: Path) -> None:
    archive, parts = _kit(tmp_path, 1024)
    assert len(parts) >= 3 and all(p.stat().st_size <= 1024 for p in parts)
    assert [p.parent.name for p in parts] == [f"p{n:02d}" for n in range(1, len(parts) + 1)]
    assert b"".join(p.read_bytes() for p in parts) == archive.read_bytes()
    done = _dry_run(tmp_path / "carry")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "wheels: 1" in done.stdout and "models: m" in done.stdout


def test_the_installer_refuses_a_missing_or_damaged_part(tmp_path: Path) -> None:
    _, parts = _kit(tmp_path, 1024)
    assert len(parts) >= 3
    data = bytearray(parts[0].read_bytes())
    data[10] ^= 0xFF
    parts[0].write_bytes(bytes(data))
    done = _dry_run(tmp_path / "carry")
    assert done.returncode == 2 and "digest mismatch" in done.stdout
    parts[1].unlink()
    done = _dry_run(tmp_path / "carry")
    assert done.returncode == 2 and "parts missing" in done.stdout
