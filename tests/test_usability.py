"""Small things users hit (issue 16): the version, help for every option, read-only
commands that leave no file behind, and actions that no worker will ever run."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import click
from click.testing import CliRunner

from asyncactions import init_action
from asyncactions.cli import main
from asyncactions.schema import async_action_worker

from .conftest import Db, cli
from .test_containers import register


def test_version() -> None:
    done = cli("--version")
    assert done.returncode == 0 and done.stdout == f"asyncactions {version('asyncactions')}\n"


def commands(group: click.Group, path: str = "asyncactions"):
    for name, command in group.commands.items():
        yield f"{path} {name}", command
        if isinstance(command, click.Group):
            yield from commands(command, f"{path} {name}")


def test_every_command_and_option_has_help_text() -> None:
    missing = [f"{path} {param.opts[0]}"
               for path, command in [("asyncactions", main), *commands(main)]
               for param in command.params
               if isinstance(param, click.Option) and not param.help]
    missing += [path for path, command in commands(main) if not command.help]
    assert missing == []


def test_read_only_commands_on_a_missing_sqlite_file_do_not_create_it(tmp_path: Path) -> None:
    path = tmp_path / "typo.db"
    url = ("--database-url", f"sqlite:///{path}")
    reads = [["list"], ["show", "1"], ["stats"], ["workers"], ["health"], ["db", "current"],
             ["db", "downgrade", "base"]]
    runner = CliRunner()  # in this process: the same commands, without 7 interpreters
    for args in reads:
        done = runner.invoke(main, [*url, *args])
        assert done.exit_code == 2, args
        assert done.stderr == (f"error: DatabaseError: no database file at {path}: run "
                               "`asyncactions db upgrade` first (it creates one), or check "
                               "--database-url / ASYNCACTIONS_DATABASE_URL\n"), args
    assert not path.exists()
    assert cli(*url, "db", "upgrade").returncode == 0 and path.exists()


def test_enqueue_says_when_a_unique_key_returned_the_live_action(db: Db) -> None:
    env = {"ASYNCACTIONS_DATABASE_URL": db.url}
    held = init_action(db.engine, "p", {}, unique_key="order:1")
    done = cli("enqueue", "p", "--unique-key", "order:1", env=env)
    assert done.returncode == 0 and done.stdout == f"{held.display_id}\n"
    assert done.stderr == (f"{held.display_id} already holds unique key 'order:1' (pending): "
                           "nothing enqueued\n")
    fresh = cli("enqueue", "p", "--unique-key", "order:2", env=env)
    assert fresh.returncode == 0 and fresh.stderr == ""
    assert fresh.stdout != done.stdout


def test_processors_says_where_processors_come_from(tmp_path: Path) -> None:
    done = cli("processors", cwd=tmp_path)
    assert done.returncode == 0
    assert "--import MODULE or `imports` in the config file" in done.stderr
    (tmp_path / "jobs.py").write_text("from asyncactions import processor\n"
                                      "processor('p')(print)\n")
    done = cli("processors", "--import", "jobs", "--format", "json", cwd=tmp_path,
               env={"PYTHONPATH": f"{Path(__file__).parent.parent}:{tmp_path}"})
    assert done.stderr == "processors registered by: jobs\n"
    assert json.loads(done.stdout)["name"] == "p"


def test_actions_no_live_worker_serves_show_in_stats_and_processors(db: Db,
                                                                     tmp_path: Path) -> None:
    env = {"ASYNCACTIONS_DATABASE_URL": db.url}
    register(db, "live:1:x", "live")
    with db.engine.begin() as conn:  # a live worker serves p
        conn.execute(async_action_worker.update().values(processors="p"))
    register(db, "gone:1:x", "gone", beat_age=3600)  # lease long over: serves nothing
    with db.engine.begin() as conn:
        conn.execute(async_action_worker.update()
                     .where(async_action_worker.c.id == "gone:1:x").values(processors="sendd"))
    init_action(db.engine, "p", {})
    init_action(db.engine, "sendd", {})  # a typo of "send"
    init_action(db.engine, "sendd", {})

    stats = [json.loads(line) for line in
             cli("stats", "--format", "json", env=env, cwd=tmp_path).stdout.splitlines()]
    assert {s["processor"]: s["served"] for s in stats} == {"p": True, "sendd": False}
    table = cli("stats", env=env, cwd=tmp_path).stdout
    assert "pending actions that no live worker serves" in table
    assert "no worker serves this" in table.split("pending actions that")[1]

    rows = [json.loads(line) for line in
            cli("processors", "--format", "json", env=env, cwd=tmp_path).stdout.splitlines()]
    assert [(r["name"], r["served"]) for r in rows] == [
        ("sendd", "no worker serves this (2 pending actions)")]
