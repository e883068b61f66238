"""The API keys file (router/keys_file.py) and ``llm-fleet keys create|list|revoke``."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

import pytest
import yaml

from llm_fleet.cli.main import main
from llm_fleet.deployments.errors import ConfigError
from llm_fleet.router import keys_file as keys
from llm_fleet.router.keys_file import (
    create_key,
    hash_key,
    key_matches,
    list_keys,
    load_keys,
    revoke_key,
)


@pytest.fixture(autouse=True)
def _no_keys_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLM_FLEET_KEYS_FILE", raising=False)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "keys.yaml"


def test_create_returns_the_key_once_and_stores_only_its_hash(path: Path) -> None:
    key = create_key(path, "team-a", models=["gemma-3-270m"], rpm=60, tpm=1000)
    assert key.startswith("lfk_") and len(key) == len("lfk_") + 43
    text = path.read_text()
    assert key not in text and key.removeprefix("lfk_") not in text
    [entry] = list_keys(path)
    assert entry.hash == "sha256:" + hashlib.sha256(key.encode()).hexdigest() == hash_key(key)
    assert key_matches(key, entry.hash) and not key_matches(key + "x", entry.hash)
    assert (entry.name, entry.models, entry.rpm, entry.tpm) == (
        "team-a",
        ["gemma-3-270m"],
        60,
        1000,
    )
    assert (entry.max_tokens, entry.concurrency, entry.revoked) == (None, None, False)
    assert re.fullmatch("[0-9a-f]{8}", entry.id), entry.id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # The documented format: a plain timestamp, every model by default, no nulls written.
    raw = yaml.safe_load(text)["keys"][0]
    assert "concurrency" not in raw and raw["created"].tzinfo is not None
    assert f"created: {entry.created.strftime('%Y-%m-%dT%H:%M:%SZ')}" in text


def test_keys_are_unique_and_default_to_every_model(path: Path) -> None:
    first, second = create_key(path, "a"), create_key(path, "b")
    assert first != second
    a, b = list_keys(path)
    assert a.models == ["*"] and a.id != b.id and a.hash != b.hash


def test_an_existing_file_keeps_its_mode(path: Path) -> None:
    create_key(path, "a")
    path.chmod(0o640)
    create_key(path, "b")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_a_name_is_taken_even_when_revoked(path: Path) -> None:
    create_key(path, "a")
    revoke_key(path, "a")
    with pytest.raises(ConfigError, match="a key named 'a' exists already"):
        create_key(path, "a")


def test_revoke_by_name_or_id_is_idempotent(path: Path) -> None:
    create_key(path, "a")
    create_key(path, "b")
    b_id = list_keys(path)[1].id
    assert revoke_key(path, "a").revoked
    assert revoke_key(path, b_id).name == "b"
    assert revoke_key(path, "a").revoked
    assert [k.revoked for k in list_keys(path)] == [True, True]
    with pytest.raises(ConfigError, match="no key named or with id 'zzz'"):
        revoke_key(path, "zzz")


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_key(path, "a")
    before = path.read_text()

    def refuse(src: str, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keys.os, "replace", refuse)
    with pytest.raises(ConfigError, match="cannot write: No space left on device"):
        create_key(path, "b")
    assert path.read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["keys.yaml", "keys.yaml.lock"]


VALID = {
    "name": "team-a",
    "id": "3f9c1a2b",
    "hash": "sha256:" + "0" * 64,
    "models": ["*"],
    "created": "2026-11-22T19:00:00Z",
}


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"keys": [{**VALID, "rpm": 0}]}, "keys.0.rpm: Input should be greater than or equal to 1"),
        ({"keys": [{**VALID, "key": "lfk_plain"}]}, "keys.0.key: Extra inputs are not permitted"),
        ({"keys": [{**VALID, "hash": "md5:abc"}]}, "keys.0.hash: String should match pattern"),
        ({"keys": [{**VALID, "models": ["*", "a"]}]}, "keys.0.models: '*' stands alone"),
        ({"keys": [{**VALID, "models": []}]}, "keys.0.models: List should have at least 1"),
        ({"keys": [VALID, {**VALID, "id": "00000000"}]}, "keys: two keys have the same name"),
        ({"keys": [VALID, {**VALID, "name": "b", "id": "00000000"}]}, "same hash"),
        ({"keyz": []}, "keyz: Extra inputs are not permitted"),
        (["not", "a", "mapping"], "(top level): Input should be a valid dictionary"),
    ],
)
def test_load_names_the_failing_field(path: Path, document: object, expected: str) -> None:
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError) as info:
        load_keys(path)
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)
    assert "lfk_plain" not in str(info.value) and "0" * 64 not in str(info.value)


def test_load_accepts_the_documented_example_and_an_empty_file(path: Path) -> None:
    path.write_text(
        "keys:\n  - name: team-a\n    id: 3f9c1a2b\n    hash: sha256:" + "a" * 64 + "\n"
        '    models: ["*"]\n    rpm: 60\n    tpm: 100000\n    max_tokens: 512\n'
        "    concurrency: 4\n    revoked: false\n    created: 2026-11-22T19:00:00Z\n"
    )
    [entry] = load_keys(path).keys
    assert (entry.rpm, entry.tpm, entry.max_tokens, entry.concurrency) == (60, 100000, 512, 4)
    path.write_text("")
    assert load_keys(path).keys == []


def test_load_problems_that_are_not_fields(path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_keys(path)
    path.write_text("keys: [\n  - name: lfk_secretish\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line \d+, column \d+\)") as info:
        load_keys(path)
    assert "lfk_secretish" not in str(info.value)


# --- the CLI ------------------------------------------------------------------------


def test_cli_create_list_revoke(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "create", "--file", str(path), "--name", "team-a"]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("lfk_") and out == key + "\n"  # stdout is the key alone
    [warning] = err.splitlines()
    assert "team-a" in warning and "cannot be shown again" in warning and key not in warning
    assert key not in path.read_text()

    limits = ["--rpm", "6", "--tpm", "700", "--max-tokens", "32", "--concurrency", "2"]
    create_b = ["keys", "create", "--file", str(path), "--name", "b", "--models", "m1, m2"]
    assert main([*create_b, *limits]) == 0
    second = capsys.readouterr().out.strip()

    assert main(["keys", "list", "--file", str(path)]) == 0
    listing = capsys.readouterr().out
    rows = [line.split("\t") for line in listing.splitlines()]
    a, b = list_keys(path)
    assert rows[0][:3] == ["name", "id", "models"]
    assert rows[0][3:] == ["rpm", "tpm", "max_tokens", "concurrency", "state", "created"]
    assert rows[1][:8] == ["team-a", a.id, "*", "-", "-", "-", "-", "active"]
    assert rows[2][:8] == ["b", b.id, "m1,m2", "6", "700", "32", "2", "active"]
    for secret in (key, second, a.hash, b.hash, a.hash.removeprefix("sha256:")):
        assert secret not in listing

    assert main(["keys", "revoke", "--file", str(path), "team-a"]) == 0
    assert capsys.readouterr().out == f"key 'team-a' (id {a.id}) is revoked\n"
    assert main(["keys", "revoke", "--file", str(path), b.id]) == 0
    capsys.readouterr()
    assert main(["keys", "list", "--file", str(path)]) == 0
    states = [line.split("\t")[7] for line in capsys.readouterr().out.splitlines()[1:]]
    assert states == ["revoked", "revoked"]


def test_cli_file_defaults_to_the_env_variable(
    path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["keys", "list"]) == 2
    assert "pass --file or set LLM_FLEET_KEYS_FILE" in capsys.readouterr().err
    monkeypatch.setenv("LLM_FLEET_KEYS_FILE", str(path))
    assert main(["keys", "create", "--name", "env-key"]) == 0
    capsys.readouterr()
    assert [k.name for k in list_keys(path)] == ["env-key"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create", "--name", "a", "--models", "bad model"], "not model ids: 'bad model'"),
        (["create", "--name", "a", "--rpm", "0"], "rpm: Input should be greater than or equal"),
        (["create", "--name", "has space"], "name: String should match pattern"),
        (["create", "--name", "dup"], "a key named 'dup' exists already"),
        (["revoke", "nobody"], "no key named or with id 'nobody'"),
        (["create", "--name", "a", "--rpm", "x"], "invalid int value"),
        (["create"], "the following arguments are required: --name"),
    ],
)
def test_cli_usage_and_config_errors_exit_2(
    path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    create_key(path, "dup")
    before = path.read_text()
    assert main(["keys", *args[:1], "--file", str(path), *args[1:]]) == 2
    out, err = capsys.readouterr()
    assert message in err and out == ""
    assert path.read_text() == before


def test_cli_invalid_file_exits_2_naming_the_field(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path.write_text(yaml.safe_dump({"keys": [{**VALID, "tpm": -1}]}))
    assert main(["keys", "list", "--file", str(path)]) == 2
    assert f"llm-fleet keys: {path}: keys.0.tpm:" in capsys.readouterr().err


def test_cli_unwritable_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-dir" / "keys.yaml"
    assert main(["keys", "create", "--file", str(missing), "--name", "a"]) == 2
    assert "cannot write: folder" in capsys.readouterr().err
    assert not os.path.exists(missing.parent)
