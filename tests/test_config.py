"""SPEC §6 configuration: durations, the TOML file, environment overrides, clear errors."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from asyncactions.config import EMBEDDED_DATABASE_URL, ConfigError, load_config
from asyncactions.durations import format_duration, parse_duration


@pytest.mark.parametrize(("text", "expected"), [
    ("500ms", timedelta(milliseconds=500)), ("30s", timedelta(seconds=30)),
    ("5m", timedelta(minutes=5)), ("2h", timedelta(hours=2)), ("7d", timedelta(days=7)),
    ("1.5s", timedelta(seconds=1.5)), ("0s", timedelta(0)),
])
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["5", "5 minutes", "-1s", "", "1w", "s"])
def test_bad_durations_say_how_to_write_one(text: str) -> None:
    with pytest.raises(ConfigError, match="write it like 500ms, 30s, 5m, 2h or 7d"):
        parse_duration(text)


def test_format_duration_is_the_inverse_for_whole_units() -> None:
    for text in ("500ms", "30s", "5m", "2h", "7d"):
        assert format_duration(parse_duration(text)) == text


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "asyncactions.toml"
    path.write_text(body)
    return path


def test_the_spec_example_file_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASYNCACTIONS_DATABASE_URL", raising=False)
    config = load_config(write(tmp_path, """
database_url = "postgresql+psycopg://localhost/app"
imports = ["myapp.processors"]

[worker]
concurrency = 10
poll_interval = "1s"
lease = "60s"
shutdown_grace = "30s"

[processors.send_welcome_email]
retries = 5
retry_interval = "10m"
enabled = true
"""))
    assert config.database_url == "postgresql+psycopg://localhost/app"
    assert config.imports == ("myapp.processors",)
    assert config.worker.lease == timedelta(seconds=60)
    assert config.processors == {"send_welcome_email": {
        "retries": 5, "retry_interval": timedelta(minutes=10), "enabled": True}}


def test_environment_and_explicit_url_override_the_file(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, 'database_url = "sqlite:///file.db"\n')
    monkeypatch.setenv("ASYNCACTIONS_DATABASE_URL", "sqlite:///env.db")
    assert load_config(path).database_url == "sqlite:///env.db"
    assert load_config(path, "sqlite:///flag.db").database_url == "sqlite:///flag.db"
    monkeypatch.setenv("ASYNCACTIONS_CONFIG", str(path))
    monkeypatch.delenv("ASYNCACTIONS_DATABASE_URL")
    assert load_config().database_url == "sqlite:///file.db"


def test_default_locations_and_the_embedded_default(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASYNCACTIONS_DATABASE_URL", raising=False)
    monkeypatch.delenv("ASYNCACTIONS_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert load_config().effective_database_url == EMBEDDED_DATABASE_URL
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "asyncactions.toml").write_text("[worker]\nconcurrency = 3\n")
    assert load_config().worker.concurrency == 3
    (tmp_path / "asyncactions.toml").write_text("[worker]\nconcurrency = 4\n")
    assert load_config().worker.concurrency == 4


@pytest.mark.parametrize(("body", "message"), [
    ("[worker]\nconcurency = 3\n",
     "[worker]: unknown key 'concurency'; allowed: concurrency, lease, listen, poll_interval, "
     "shutdown_grace"),
    ("[worker]\nconcurrency = 'ten'\n",
     "[worker] concurrency: must be a whole number from 1 to 10000"),
    ("[worker]\nlease = '60 seconds'\n", "[worker] lease: '60 seconds' is not a duration"),
    ("[processors.x]\nretries = -1\n",
     "[processors.x] retries: must be a whole number from 0 to 1000000"),
    ("[processors.x]\nbackoff = 'linear'\n", 'must be "fixed" or "exponential"'),
    ("[processors.x]\ncolour = 'red'\n", "[processors.x]: unknown key 'colour'"),
    ("databse_url = 'x'\n", "unknown key 'databse_url'"),
    ("[worker\n", "malformed TOML"),
])
def test_config_errors_name_the_key_and_what_is_allowed(tmp_path: Path, body: str,
                                                         message: str) -> None:
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_retention_defaults_and_overrides(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).retention == {
        "completed": timedelta(days=7), "canceled": timedelta(days=7),
        "failed": timedelta(days=30)}
    config = load_config(write(tmp_path, '[retention]\ncompleted = "1h"\nfailed = "forever"\n'))
    assert config.retention == {"completed": timedelta(hours=1),
                                "canceled": timedelta(days=7), "failed": None}
    with pytest.raises(ConfigError, match=r"\[retention\]: unknown key 'running'"):
        load_config(write(tmp_path, '[retention]\nrunning = "1h"\n'))


def test_max_data_bytes_from_the_config_applies_to_cli_enqueues(tmp_path: Path) -> None:
    from .conftest import cli

    (tmp_path / "asyncactions.toml").write_text('max_data_bytes = 64\nimports = ["jobs"]\n')
    (tmp_path / "jobs.py").write_text("from asyncactions import processor\n"
                                      "processor('p')(print)\n")
    assert cli("db", "upgrade", cwd=tmp_path).returncode == 0
    out = cli("enqueue", "p", "--data", '{"text": "' + "x" * 100 + '"}', cwd=tmp_path)
    assert out.returncode == 2
    assert "over the limit of 64" in out.stderr
