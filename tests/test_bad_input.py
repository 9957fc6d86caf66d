"""Every user mistake is one line on stderr starting "error: ", exit status 2, no
traceback and nothing changed; dangerous settings are refused with what is allowed;
no URL is echoed with its password. Rows that do not decode can still be operated on.
"""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import bindparam, text

from asyncactions import migrate
from asyncactions.config import ConfigError, check_concurrency, load_config
from asyncactions.database import describe, make_engine
from asyncactions.schema import UtcDateTime

from .conftest import Db, cli


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def load(tmp_path: Path, body: str) -> str:
    """The ConfigError that loading `body` raises, checked to be one line."""
    path = tmp_path / "asyncactions.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


# --- configuration --------------------------------------------------------------------

@pytest.mark.parametrize(("body", "message"), [
    ('[worker]\nlease = "0s"\n', "[worker] lease: must be from 1s to 1h, got '0s'"),
    ('[worker]\nlease = "2h"\n', "[worker] lease: must be from 1s to 1h, got '2h'"),
    ('[worker]\npoll_interval = "0s"\n',
     "[worker] poll_interval: must be from 10ms to 1h, got '0s'"),
    ('[worker]\npoll_interval = "5ms"\n', "must be from 10ms to 1h"),
    ('[worker]\nshutdown_grace = "2h"\n',
     "[worker] shutdown_grace: must be from 0s to 1h, got '2h'"),
    ('[worker]\nshutdown_grace = "100000000d"\n', "longer than the maximum of 3650d"),
    ("[worker]\nconcurrency = 100000000\n",
     "[worker] concurrency: must be a whole number from 1 to 10000, got 100000000"),
    ("max_data_bytes = 99999999999\n",
     "max_data_bytes: must be a whole number from 16 to 67108864"),
    ("max_data_bytes = 1\n", "max_data_bytes: must be a whole number from 16 to 67108864"),
    ('[retention]\ncompleted = "100000000d"\n', "longer than the maximum of 3650d"),
    ('[processors.p]\nretry_interval = "100000000d"\n', "longer than the maximum of 3650d"),
])
def test_dangerous_settings_are_refused_with_what_is_allowed(tmp_path: Path, body: str,
                                                             message: str) -> None:
    assert message in load(tmp_path, body)


def test_the_bounds_themselves_are_allowed(tmp_path: Path) -> None:
    path = tmp_path / "asyncactions.toml"
    path.write_text('max_data_bytes = 16\n[worker]\nlease = "1s"\npoll_interval = "10ms"\n'
                    'shutdown_grace = "0s"\nconcurrency = 10000\n'
                    '[schedules.tick]\nprocessor = "p"\nevery = "1s"\n')
    config = load_config(path)
    assert config.worker.lease == timedelta(seconds=1)
    assert config.worker.poll_interval == timedelta(milliseconds=10)
    assert config.schedules[0].every == timedelta(seconds=1)


def test_worker_concurrency_from_python_has_the_same_bound() -> None:
    assert check_concurrency(10_000, "Worker(concurrency=...)") == 10_000
    with pytest.raises(ConfigError, match=r"Worker\(concurrency=...\): must be a whole "
                                          r"number from 1 to 10000, got 100000000"):
        check_concurrency(100_000_000, "Worker(concurrency=...)")


@pytest.mark.parametrize(("body", "message"), [
    ("processors = 5\n", "[processors] must be a table"),
    ('schedules = "x"\n', "[schedules] must be a table"),
    ('retention = "x"\n', "[retention] must be a table"),
    ("worker = 5\n", "[worker] must be a table"),
    ("[schedules]\na = 5\n", "[schedules.a] must be a table"),
])
def test_sections_of_the_wrong_type(tmp_path: Path, body: str, message: str) -> None:
    assert message in load(tmp_path, body)


SCHEDULE = '[schedules.nightly]\nprocessor = "p"\n'


@pytest.mark.parametrize(("body", "message"), [
    ('every = "1ms"\n', "[schedules.nightly] every: must be at least 1s, got '1ms'"),
    ("cron = 5\n", "[schedules.nightly] cron: must be a string, got 5"),
    ('cron = "0 0 30 2 *"\n', "cron: '0 0 30 2 *' never fires"),
    ('every = "1m"\ndata = { at = 10:00:00 }\n',
     '[schedules.nightly] data["at"]: object of type time is not serializable'),
    ('every = "1m"\ndata = { "$decimal" = "abc" }\n',
     "[schedules.nightly] data: {\"$decimal\": …} is reserved"),
    ('every = "1m"\ndata = { n = { "$date" = "2026-01-01" } }\n', "is reserved"),
    ('every = "1m"\ndata = { n = nan }\n', "is not a finite number"),
    ('every = "1m"\ndata = { n = "a\\u0000b" }\n',
     "[schedules.nightly] data[\"n\"]: contains a NUL character"),
    ('every = "1m"\ndata = { n = "' + "x" * 200 + '" }\n', "over the limit of 100"),
])
def test_schedule_mistakes_are_refused_at_load(tmp_path: Path, body: str,
                                               message: str) -> None:
    assert message in load(tmp_path, "max_data_bytes = 100\n" + SCHEDULE + body)


def test_schedule_data_that_reads_back_as_written_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "asyncactions.toml"
    path.write_text(SCHEDULE + 'every = "1m"\ndata = { on = 2026-01-01, n = [1, "two"] }\n')
    assert load_config(path).schedules[0].data == {"on": datetime(2026, 1, 1).date(),
                                                   "n": [1, "two"]}


@pytest.mark.parametrize(("content", "message"), [
    (b'database_url = "\xff"\n', "asyncactions.toml: not UTF-8 text (byte 16)"),
    (b"a = " + b"[" * 5000 + b"]" * 5000 + b"\n", "malformed TOML: nested too deeply"),
    (b"processors = 5\n", "[processors] must be a table"),
    (b'[schedules.a]\nprocessor = "p"\ncron = 5\n', "cron: must be a string"),
    (b'[schedules.a]\nprocessor = "p"\ncron = "0 0 30 2 *"\n', "never fires"),
])
def test_config_mistakes_through_the_cli(tmp_path: Path, content: bytes,
                                         message: str) -> None:
    (tmp_path / "asyncactions.toml").write_bytes(content)
    assert message in one_line_error(cli("schedules", cwd=tmp_path))


# --- command-line arguments -------------------------------------------------------------

@pytest.fixture
def sqlite_env(tmp_path: Path) -> dict[str, str]:
    """A migrated SQLite database with one processor known to it, for the CLI."""
    url = f"sqlite:///{tmp_path / 'bad.db'}"
    engine = make_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    (tmp_path / "jobs.py").write_text("from asyncactions import processor\n"
                                      "processor('p')(print)\n")
    return {"ASYNCACTIONS_DATABASE_URL": url}


HUGE = str(2**70)


@pytest.mark.parametrize(("args", "message"), [
    (("show", HUGE), f"'{HUGE}' is not an action id: ids run from 1 to 9223372036854775807"),
    (("cancel", HUGE), "is not an action id: ids run from 1 to 9223372036854775807"),
    (("retry", HUGE), "is not an action id: ids run from 1 to 9223372036854775807"),
    (("show", "9" * 5000), "'" + "9" * 30 + "...' is not an action id"),
    (("list", "--limit", HUGE), f"{HUGE} is not in the range 1<=x<=100000"),
    (("retry", "--status", "failed", "--retries", "99999999999", "--yes"),
     "99999999999 is not in the range 0<=x<=1000000"),
    (("enqueue", "p", "--import", "jobs", "--priority", "40000"),
     "40000 is not in the range -32768<=x<=32767"),
    (("worker", "--import", "jobs", "--concurrency", "100000000"),
     "100000000 is not in the range 1<=x<=10000"),
    (("worker", "--import", "jobs", "--processes", "100000"),
     "100000 is not in the range 1<=x<=256"),
    (("enqueue", "p", "--import", "jobs", "--delay", "3000000d"),
     "'--delay': '3000000d' is longer than the maximum of 3650d"),
    (("enqueue", "p", "--import", "jobs", "--wait", "--timeout", "3000000d"),
     "'--timeout': '3000000d' is longer than the maximum of 3650d"),
    (("list", "--since", "3000000d"), "'--since': '3000000d' is longer than the maximum"),
    (("stats", "--since", "3000000d"), "'--since': '3000000d' is longer than the maximum"),
    (("purge", "--older-than", "3000000d"), "'--older-than': '3000000d' is longer"),
])
def test_out_of_range_arguments_are_one_line(tmp_path: Path, sqlite_env: dict[str, str],
                                             args: tuple[str, ...], message: str) -> None:
    assert message in one_line_error(cli(*args, cwd=tmp_path, env=sqlite_env))


NOT_UTF8 = os.fsdecode(b"caf\xe9")  # Latin-1 bytes, as a Latin-1 terminal would send them


@pytest.mark.parametrize("args", [
    (NOT_UTF8,),
    ("p", "--related-id", NOT_UTF8),
    ("p", "--unique-key", NOT_UTF8),
    ("p", "--data", f'"{NOT_UTF8}"'),
])
def test_arguments_that_are_not_utf8_are_refused(tmp_path: Path, sqlite_env: dict[str, str],
                                                 args: tuple[str, ...]) -> None:
    line = one_line_error(cli("enqueue", *args, "--import", "jobs", cwd=tmp_path,
                              env=sqlite_env))
    assert "is not valid UTF-8 text" in line and "caf\\udce9" in line
    engine = make_engine(sqlite_env["ASYNCACTIONS_DATABASE_URL"])
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM async_action")).scalar() == 0
    engine.dispose()


@pytest.mark.parametrize(("data", "message"), [
    ('{"$decimal": "abc"}', "Invalid value for --data: {\"$decimal\": 'abc'} is not a valid "
                            "decimal"),
    ('{"when": {"$datetime": "yesterday"}}', "is not a valid datetime"),
    ('{"a": "x\\u0000y"}', 'data["a"]: contains a NUL character, which the database cannot store'),
    ('["\\ud800"]', "data[0]: '\\ud800' is not valid UTF-8 text"),
    ("[" * 5000 + "]" * 5000, "Invalid value for --data: nested too deeply"),
    ("{oops", "not valid JSON"),
])
def test_data_the_database_cannot_store_is_refused_before_it(db: Db, tmp_path: Path,
                                                             data: str, message: str) -> None:
    (tmp_path / "jobs.py").write_text("from asyncactions import processor\n"
                                      "processor('p')(print)\n")
    env = {"ASYNCACTIONS_DATABASE_URL": db.url}
    assert message in one_line_error(cli("enqueue", "p", "--import", "jobs", "--data", data,
                                         cwd=tmp_path, env=env))
    assert db.scalar("SELECT count(*) FROM async_action") == 0
    # A typed value that does decode is the codec's syntax, and is accepted.
    ok = cli("enqueue", "p", "--import", "jobs", "--data", '{"$decimal": "1.50"}',
             cwd=tmp_path, env=env)
    assert ok.returncode == 0, ok.stderr
    assert db.scalar("SELECT count(*) FROM async_action") == 1


# --- database URLs ----------------------------------------------------------------------

@pytest.mark.parametrize(("url", "message"), [
    ("postgresql://u:secret@localhost:99999/db",
     "database URL 'postgresql+psycopg://u:***@localhost:99999/db': port 99999 is not from "
     "1 to 65535"),
    ("postgresql://u:secret@localhost:abc/db",
     "database URL 'postgresql://u:***@localhost:abc/db' is not a URL"),
    ("postgresql://u:sec@ret@localhost:abc/db", "'postgresql://u:***@localhost:abc/db'"),
    ("u:secret@localhost", "database URL 'u:***@localhost' is not a URL"),
    ("mysql://u:secret@localhost/db", "'mysql://u:***@localhost/db': unsupported backend"),
])
def test_bad_urls_are_one_line_without_the_password(url: str, message: str) -> None:
    result = cli("--database-url", url, "list")
    assert message in one_line_error(result)
    assert "secret" not in result.stderr + result.stdout
    assert "secret" not in describe(url)


def test_a_file_that_is_not_a_database_is_one_line_and_left_alone(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(4096))
    before = junk.read_bytes()
    for args in (("list",), ("db", "upgrade"), ("db", "current")):
        line = one_line_error(cli("--database-url", f"sqlite:///{junk}", *args))
        assert f"cannot use the database sqlite:///{junk}: file is not a database" in line
    assert junk.read_bytes() == before


def test_a_url_that_parses_is_described_without_its_password() -> None:
    assert describe("postgresql+psycopg://u:secret@h:5432/db") == \
        "postgresql+psycopg://u:***@h:5432/db"


# --- rows that do not decode -----------------------------------------------------------

def insert_raw(db: Db, data: str | None, errors: str | None, result: str | None,
               status: str) -> None:
    """A row as an older version or a hand-written SQL statement might leave it."""
    cast = "CAST({} AS jsonb)" if db.name == "postgresql" else "{}"
    sql = text(f"INSERT INTO async_action (processor, status, data, retries, attempts, "
               f"errors, result, next_eligible_at, created_at) VALUES ('p', :status, "
               f"{cast.format(':data')}, 3, 1, {cast.format(':errors')}, "
               f"{cast.format(':result')}, :now, :now)").bindparams(
        bindparam("now", type_=UtcDateTime()))
    with db.engine.begin() as conn:
        conn.execute(sql, {"status": status, "data": data, "errors": errors,
                           "result": result, "now": datetime.now(UTC)})


def test_operator_commands_work_on_rows_that_do_not_decode(db: Db) -> None:
    deep = "[" * 5000 + "]" * 5000
    insert_raw(db, '{"$decimal": "abc"}', "[]", None, "pending")  # ASYNC-00000001
    insert_raw(db, '{"n": 1}', "[]", deep, "failed")  # ASYNC-00000002
    insert_raw(db, '{"n": 1}', "5", None, "failed")  # ASYNC-00000003: a history, not a list
    env = {"ASYNCACTIONS_DATABASE_URL": db.url}

    def ok(*args: str) -> str:
        result = cli(*args, env=env)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        return result.stdout

    listed = ok("list")
    assert all(f"ASYNC-0000000{i}" in listed for i in (1, 2, 3))
    assert '"data": "{\\"$decimal' in ok("list", "--format", "json")  # as stored
    assert '"$decimal": "abc"' in ok("show", "1")  # the data as stored
    assert deep in ok("show", "2", "--format", "json").replace("\\", "")
    assert "as stored" not in ok("show", "2")  # its history decodes: shown as usual
    assert "error history, as stored (it does not decode): 5" in ok("show", "3")
    assert "p" in ok("stats")
    assert ok("cancel", "1").strip() == "ASYNC-00000001 p canceled"
    assert ok("retry", "2", "3").splitlines() == ["ASYNC-00000002 p pending",
                                                  "ASYNC-00000003 p pending"]
    assert db.rows("SELECT id, status FROM async_action ORDER BY id") == [
        (1, "canceled"), (2, "pending"), (3, "pending")]
