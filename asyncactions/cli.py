"""The `asyncactions` command: a thin layer over the Python API.

User mistakes end as one line on stderr and exit status 2 (1 for a failed
`enqueue --wait`); never a traceback.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from sqlalchemy import Connection, Engine
from sqlalchemy import exc as sa_exc

from . import admin, audit, codec, events, reports
from . import processors as registry
from .action import Action
from .config import (
    MAX_CONCURRENCY,
    Config,
    check_payload,
    check_text,
    load_config,
)
from .database import (
    describe,
    first_line,
    has_schema,
    make_engine,
    require_file,
    require_schema,
)
from .durations import format_duration, parse_duration
from .enqueue import init_action
from .errors import AsyncActionsError, ConfigError, UnknownProcessor
from .output import FORMATS, emit


@dataclass
class State:
    config_path: str | None
    database_url: str | None
    _config: Config | None = None
    _engine: Engine | None = field(default=None, repr=False)

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path, self.database_url)
        return self._config

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.config.effective_database_url)
        return self._engine

    @property
    def checked_engine(self) -> Engine:
        """The engine, once the schema is known to be there (else a one-line hint)."""
        require_schema(self.engine)
        return self.engine


class Group(click.Group):
    """Turn our errors and database outages into one line and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AsyncActionsError as exc:
            _fail(f"{type(exc).__name__}: {exc}")
        except sa_exc.OperationalError as exc:
            _fail(f"DatabaseError: {first_line(exc)}; check --database-url / "
                  "ASYNCACTIONS_DATABASE_URL and that the server is running")
        except sa_exc.ProgrammingError as exc:
            _fail(f"DatabaseError: {first_line(exc)}; has `asyncactions db upgrade` been run?")
        except sa_exc.DBAPIError as exc:  # the database refused a value: nothing was changed
            _fail(f"DatabaseError: {first_line(exc)}")


def run() -> None:
    """Console entry point: click's own usage errors also end as one line."""
    try:
        for number, arg in enumerate(sys.argv[1:], 1):  # before anything reaches the database
            check_text(arg, f"command-line argument {number}")
        main(prog_name="asyncactions", standalone_mode=False)  # also under python -m
    except ConfigError as exc:
        _fail(str(exc))
    except click.exceptions.Abort:
        _fail("aborted", code=130)
    except click.ClickException as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" \
            if getattr(exc, "ctx", None) and " " in exc.ctx.command_path else ""
        _fail(exc.format_message().replace("\n", " ") + hint, code=exc.exit_code)


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _duration(_ctx: Any, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return parse_duration(value, what=f"--{param.name.replace('_', '-')}")
    except ConfigError as exc:
        raise click.BadParameter(str(exc).split(": ", 1)[1]) from None


def _statuses(_ctx: Any, _param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return audit.parse_statuses(value)
    except AsyncActionsError as exc:
        raise click.BadParameter(str(exc)) from None


def _format_option(fn: Any) -> Any:
    return click.option("--format", "fmt", type=click.Choice(FORMATS), default="table",
                        show_default=True, help="A table for people; JSON lines or CSV for "
                        "programs.")(fn)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="asyncactions", message="%(prog)s %(version)s")
@click.option("--config", "config_path", metavar="PATH",
              help="TOML config (env ASYNCACTIONS_CONFIG; default ./asyncactions.toml, then "
                   "config/asyncactions.toml).")
@click.option("--database-url", metavar="URL",
              help="Database URL (env ASYNCACTIONS_DATABASE_URL; default sqlite:///asyncactions.db).")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, database_url: str | None) -> None:
    """asyncactions: a durable work queue in your own database."""
    ctx.obj = State(config_path, database_url)


MAX_PROCESSES = 256  # worker processes under one supervisor

# --- worker ---------------------------------------------------------------------------

@main.command()
@click.option("--import", "imports", multiple=True, metavar="MODULE",
              help="Module that registers processors (repeatable).")
@click.option("--processors", metavar="A,B", help="Run only these processors.")
@click.option("--concurrency", type=click.IntRange(1, MAX_CONCURRENCY),
              help=f"Actions in flight at once (1 to {MAX_CONCURRENCY}).")
@click.option("--processes", type=click.IntRange(1, MAX_PROCESSES), default=1,
              show_default=True,
              help="Worker processes under one supervisor that restarts any that dies.")
@click.option("--burst", is_flag=True, help="Drain what is eligible now, then exit 0.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), metavar="P",
              help="Serve Prometheus metrics on this port (process i of --processes: P+i).")
@click.pass_obj
def worker(state: State, imports: tuple[str, ...], processors: str | None,
           concurrency: int | None, processes: int, burst: bool,
           metrics_port: int | None) -> None:
    """Run a worker until SIGTERM/SIGINT (or, with --burst, until nothing is eligible)."""
    from .worker import Worker

    _configure_logging()
    names = [n.strip() for n in processors.split(",") if n.strip()] if processors else None
    # Built here even with --processes, so bad input is reported once, by the parent.
    one = Worker(config=state.config, imports=imports, processors=names,
                 concurrency=concurrency, metrics_port=metrics_port)
    if processes == 1:
        _collect_for_a_worker()
        one.run(burst=burst)
        return
    from .supervisor import Supervisor

    commands = [_child_command(state, imports, processors, concurrency, burst,
                               metrics_port + i if metrics_port else None)
                for i in range(processes)]
    sys.exit(Supervisor(commands, burst).run())


def _collect_for_a_worker() -> None:
    """The worker command owns its process, so it tunes the process's garbage collector:
    what start-up made (modules, settings) lives as long as the worker, so the collector
    need not walk it again, and an attempt's short-lived objects are freed by reference
    counting long before a collection would find them. A drain of 20,000 no-op actions
    spent 84-92 ms collecting, one full collection of 60-67 ms stopping every thread;
    with these, none."""
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def _child_command(state: State, imports: tuple[str, ...], processors: str | None,
                   concurrency: int | None, burst: bool, metrics_port: int | None) -> list[str]:
    command = [sys.executable, "-m", "asyncactions"]
    if state.config_path:
        command += ["--config", state.config_path]
    if state.database_url:
        command += ["--database-url", state.database_url]
    command.append("worker")
    for module in imports:
        command += ["--import", module]
    for option, value in (("--processors", processors), ("--concurrency", concurrency),
                          ("--metrics-port", metrics_port)):
        if value is not None:
            command += [option, str(value)]
    return [*command, "--burst"] if burst else command


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("apscheduler", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# --- db -------------------------------------------------------------------------------

@main.group()
def db() -> None:
    """Schema migrations (Alembic, version table asyncactions_alembic_version)."""


@db.command()
@click.pass_obj
def upgrade(state: State) -> None:
    """Create or upgrade the schema to the newest revision."""
    from . import migrate

    migrate.upgrade(state.engine)
    click.echo(f"{describe(state.engine)} is at revision {migrate.current(state.engine)}")


@db.command()
@click.argument("revision")
@click.pass_obj
def downgrade(state: State, revision: str) -> None:
    """Downgrade the schema to REVISION ("base" removes it)."""
    from . import migrate

    require_file(state.engine)
    try:
        migrate.downgrade(state.engine, revision)
    except Exception as exc:  # alembic reports unknown revisions with its own exceptions
        if isinstance(exc, AsyncActionsError | sa_exc.OperationalError):
            raise
        raise AsyncActionsError(f"cannot downgrade to {revision!r}: {first_line(exc)}; "
                                "`asyncactions db current` shows the revision") from None
    click.echo(f"{describe(state.engine)} is at revision "
               f"{migrate.current(state.engine) or 'base'}")


@db.command()
@click.pass_obj
def current(state: State) -> None:
    """Show the schema's revision and the newest one."""
    from . import migrate

    require_file(state.engine)
    rev = migrate.current(state.engine)
    head = migrate.head()
    click.echo(f"{rev or 'base (no schema)'}" + ("" if rev == head else f" (newest: {head})"))


@db.command()
@click.option("--dialect", type=click.Choice(["postgresql", "sqlite"]),
              help="Default: the configured database's, else postgresql.")
@click.option("--from", "since", metavar="REV",
              help="Only what is new since this revision (`db current` on the database).")
@click.pass_obj
def sql(state: State, dialect: str | None, since: str | None) -> None:
    """Print the DDL of every migration, for a DBA to review or apply."""
    from . import migrate

    if dialect is None:
        url = state.config.database_url
        dialect = "sqlite" if url and url.startswith("sqlite") else "postgresql"
    ddl = migrate.offline_sql(dialect, since)
    if not ddl:
        click.echo(f"nothing new since {since} (the newest revision)", err=True)
    click.echo(ddl, nl=False)


# --- enqueue ----------------------------------------------------------------------------

@main.command()
@click.argument("processor")
@click.option("--data", default=None, metavar="JSON", help="The action's data, as JSON.")
@click.option("--related-id", metavar="ID", help="Id of the related business record.")
@click.option("--delay", callback=_duration, metavar="DURATION", help="Eligible after, e.g. 5m.")
@click.option("--priority", type=click.IntRange(-32768, 32767), default=0, show_default=True,
              help="Lower runs first (-32768 to 32767).")
@click.option("--unique-key", metavar="KEY",
              help="Enqueue nothing if a pending or running action holds this key.")
@click.option("--import", "imports", multiple=True, metavar="MODULE",
              help="Module that registers processors (to check the name).")
@click.option("--wait", is_flag=True, help="Block until the action is final; print its result.")
@click.option("--timeout", callback=_duration, metavar="DURATION",
              help="With --wait: give up after this long (exit 3).  [default: 60s]")
@click.pass_obj
def enqueue(state: State, processor: str, data: str | None, related_id: str | None,
            delay: Any, priority: int, unique_key: str | None, imports: tuple[str, ...],
            wait: bool, timeout: Any) -> None:
    """Enqueue one action by hand; prints its id (that of the live action holding
    --unique-key, if one does)."""
    if timeout is not None and not wait:
        raise click.BadParameter("only makes sense with --wait", param_hint="--timeout")
    payload = None if data is None else _payload(state, data)
    engine = state.checked_engine
    _check_processor_known(state, engine, processor, imports)
    holder = audit.live_holder(engine, unique_key) if unique_key is not None else None
    action = init_action(engine, processor, payload, related_id=related_id, delay=delay,
                         priority=priority, unique_key=unique_key,
                         max_data_bytes=state.config.max_data_bytes)
    click.echo(action.display_id)
    if action.id == holder:
        click.echo(f"{action.display_id} already holds unique key {unique_key!r} "
                   f"({action.status}): nothing enqueued", err=True)
    if wait:
        try:
            final = admin.wait_for(engine, action.id,
                                   timeout.total_seconds() if timeout else 60)
        except TimeoutError as exc:
            _fail(f"TimeoutError: {exc}", code=3)
        _print_final(final)


def _payload(state: State, data: str) -> Any:
    """--data as a value; refused here, in one line, if the database could not store it."""
    try:
        payload = codec.loads(data)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON ({exc})", param_hint="--data") from None
    except ValueError as exc:  # a typed value ({"$decimal": ...}) that does not decode
        raise click.BadParameter(str(exc), param_hint="--data") from None
    except RecursionError:
        raise click.BadParameter("nested too deeply", param_hint="--data") from None
    try:
        check_payload(payload, "data", state.config.max_data_bytes)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--data") from None
    return payload


def _print_final(action: Action) -> None:
    click.echo(f"{action.display_id} {action.status}")
    if action.result is not None:
        click.echo(codec.dumps(action.result))
    if action.status != "completed":
        _fail(f"{action.display_id} {action.status}: {action.error or 'no error recorded'}",
              code=1)


def _check_processor_known(state: State, engine: Engine, name: str,
                           imports: tuple[str, ...] = ()) -> None:
    reports.check_processor_known(state.config, engine, name, imports)


# --- events and rules -------------------------------------------------------------------

@main.command()
@click.argument("event")
@click.option("--data", default=None, metavar="JSON", help="The event's data, as JSON.")
@click.option("--related-id", metavar="ID", help="Id of the related business record.")
@click.option("--delay", callback=_duration, metavar="DURATION", help="Eligible after, e.g. 5m.")
@_format_option
@click.pass_obj
def publish(state: State, event: str, data: str | None, related_id: str | None, delay: Any,
            fmt: str) -> None:
    """Publish EVENT: one action per processor a rule binds to it, all in one
    transaction; prints them (none when no rule matches, said on stderr)."""
    payload = None if data is None else _payload(state, data)
    actions = events.publish(state.checked_engine, event, payload, related_id=related_id,
                             delay=delay, max_data_bytes=state.config.max_data_bytes)
    if not actions:
        click.echo(f"no rule binds {event!r} to a processor: nothing was enqueued "
                   "(`asyncactions rules` lists them)", err=True)
    emit([{"id": a.display_id if fmt == "table" else a.id, "processor": a.processor,
           "event": a.event} for a in actions], ["id", "processor", "event"], fmt)


@main.group()
def rule() -> None:
    """Add or remove a rule binding an event to a processor."""


@rule.command("add")
@click.argument("event")
@click.argument("processor_name", metavar="PROCESSOR")
@click.option("--import", "imports", multiple=True, metavar="MODULE",
              help="Module that registers processors (to check the name).")
@click.pass_obj
def rule_add(state: State, event: str, processor_name: str, imports: tuple[str, ...]) -> None:
    """Bind PROCESSOR to EVENT: each publish of EVENT enqueues an action for it. A
    processor not known here is bound anyway (producers may not know the processors)
    with a warning naming it."""
    engine = state.checked_engine
    try:
        _check_processor_known(state, engine, processor_name, imports)
    except UnknownProcessor as exc:
        click.echo(f"warning: {exc}; the rule is added anyway: check the name", err=True)
    added = events.add_rule(engine, event, processor_name, created_by=admin.operator())
    click.echo(f"{event} -> {processor_name}: {'added' if added else 'already there'}")


@rule.command("remove")
@click.argument("event")
@click.argument("processor_name", metavar="PROCESSOR")
@click.pass_obj
def rule_remove(state: State, event: str, processor_name: str) -> None:
    """Unbind PROCESSOR from EVENT."""
    if not events.remove_rule(state.checked_engine, event, processor_name):
        _fail(f"no rule binds {event!r} to {processor_name!r}; `asyncactions rules` lists "
              "them")
    click.echo(f"{event} -> {processor_name}: removed")


@main.command()
@_format_option
@click.pass_obj
def rules(state: State, fmt: str) -> None:
    """The rules binding events to processors."""
    emit([r._asdict() for r in events.list_rules(state.checked_engine)],
         ["event", "processor", "created_at", "created_by"], fmt)


# --- audit ------------------------------------------------------------------------------

# Rows a listing prints at most: for more, page with --since or use SQL.
MAX_LIMIT = 100_000
FIELDS = reports.FIELDS
SUMMARY = ("id", "processor", "status", "attempts", "retries", "related_id", "created_at",
           "finished_at", "error")


@main.command("list")
@click.option("--status", callback=_statuses, metavar="S[,S...]",
              help="Only these statuses (pending, running, completed, failed, canceled).")
@click.option("--processor", metavar="NAME", help="Only this processor's actions.")
@click.option("--related-id", metavar="ID", help="Only actions of this business record.")
@click.option("--since", callback=_duration, metavar="DURATION",
              help="Only actions created within, e.g. 24h.")
@click.option("--event", metavar="EVENT", help="Only actions this event's rules created.")
@click.option("--limit", type=click.IntRange(1, MAX_LIMIT), default=50, show_default=True,
              help=f"At most this many actions (1 to {MAX_LIMIT}).")
@_format_option
@click.pass_obj
def list_cmd(state: State, status: tuple[str, ...] | None, processor: str | None,
             related_id: str | None, since: Any, event: str | None, limit: int,
             fmt: str) -> None:
    """List actions, newest first. JSON and CSV carry every field."""
    engine = state.checked_engine
    if processor is not None:
        _check_processor_known(state, engine, processor)
    actions = audit.list_actions(engine, audit.Filter(status or (), processor, related_id,
                                                      since, event), limit=limit)
    if fmt == "table":
        emit([reports.record(a, human=True) for a in actions], SUMMARY, fmt)
    else:
        emit([reports.record(a) for a in actions], FIELDS, fmt)


@main.command()
@click.argument("action_id", metavar="ID")
@_format_option
@click.pass_obj
def show(state: State, action_id: str, fmt: str) -> None:
    """Show one action: every field, its timings and its error history with tracebacks."""
    engine = state.checked_engine
    action = admin.get_action(engine, action_id)
    fields = reports.show(action, audit.db_clock(engine), human=fmt == "table")
    if fmt != "table":
        emit([fields], list(fields), fmt)
        return
    rows = [{"field": k, "value": v} for k, v in fields.items() if k != "errors"]
    emit(rows, ["field", "value"], fmt, title=str(action))
    if isinstance(action.errors, str):  # a row that does not decode: shown as stored
        click.echo(f"\nerror history, as stored (it does not decode): {action.errors}")
        return
    for entry in action.errors:
        click.echo(f"\nattempt {entry.get('attempt')} at {entry.get('at')} on "
                   f"{entry.get('worker')}: {entry.get('error')}")
        if entry.get("traceback"):
            click.echo(entry["traceback"].rstrip())


STATS_COLUMNS = ("processor", "total", *audit.STATUSES, "success_rate", "retry_rate",
                 "mean_run_time", "p95_run_time")


@main.command()
@click.option("--since", callback=_duration, default="24h", show_default=True,
              metavar="DURATION", help="Over the actions created within this window.")
@_format_option
@click.pass_obj
def stats(state: State, since: Any, fmt: str) -> None:
    """Per processor: counts by status, success rate, retry rate, mean and p95 run time,
    top errors. Run times in JSON and CSV are seconds; rates are fractions."""
    rows = reports.stats(state.checked_engine, since)
    serving = audit.serving(state.engine, state.config.worker.lease)
    if fmt != "table":
        for row in rows:
            row["served"] = row["processor"] in serving.served
        emit(rows, [*STATS_COLUMNS, "top_errors", "served"], fmt)
        return
    emit(rows, STATS_COLUMNS, fmt, title=f"actions created in the last {format_duration(since)}")
    if serving.unserved:
        emit([{"processor": name, "pending": n, "note": reports.NOT_SERVED}
              for name, n in serving.unserved.items()], ["processor", "pending", "note"], fmt,
             title="pending actions that no live worker serves")
    errors = [{"processor": r["processor"], **e} for r in rows for e in r["top_errors"]]
    if errors:
        emit(errors, ["processor", "count", "error"], fmt, title="top errors")


# --- steering ---------------------------------------------------------------------------

@main.command()
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--status", callback=_statuses, metavar="S[,S...]",
              help="By filter: actions in these statuses (default failed).")
@click.option("--processor", metavar="NAME", help="By filter: only this processor's actions.")
@click.option("--retries", type=click.IntRange(0, registry.MAX_RETRIES),
              help="Set retries remaining (default: unchanged).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def retry(state: State, ids: tuple[str, ...], status: tuple[str, ...] | None,
          processor: str | None, retries: int | None, yes: bool) -> None:
    """Run finished actions again now: by id, or by filter (asks first). Attempts and
    error history are kept."""
    _steer(state, "retry", "retried", ids, status, processor, yes, ("failed",),
           lambda conn, i: admin.retry(conn, i, retries=retries),
           lambda engine, where, dry_run: admin.retry_matching(engine, where, retries=retries,
                                                               dry_run=dry_run))


@main.command()
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--processor", metavar="NAME", help="By filter: only this processor's actions.")
@click.option("--status", callback=_statuses, metavar="S[,S...]",
              help="By filter: actions in these statuses (default pending).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def cancel(state: State, ids: tuple[str, ...], processor: str | None,
           status: tuple[str, ...] | None, yes: bool) -> None:
    """Cancel pending or running actions: by id, or by filter (asks first). A running
    attempt finishes, but its outcome is not recorded."""
    _steer(state, "cancel", "canceled", ids, status, processor, yes, ("pending",),
           admin.cancel,
           lambda engine, where, dry_run: admin.cancel_matching(engine, where, dry_run=dry_run))


def _steer(state: State, verb: str, past: str, ids: tuple[str, ...],
           status: tuple[str, ...] | None, processor: str | None, yes: bool,
           default_status: tuple[str, ...], one: Callable[[Connection, int], Action],
           matching: Callable[[Engine, audit.Filter, bool], int]) -> None:
    """By ids: all in one transaction, so one bad id changes nothing. By filter: count,
    confirm (on a terminal, unless --yes), then change."""
    if ids:
        if status or processor:
            raise click.UsageError("give action ids or a filter (--status, --processor), "
                                   "not both")
        with state.checked_engine.begin() as conn:
            done = [one(conn, i) for i in dict.fromkeys(map(admin.parse_id, ids))]
        for action in done:
            click.echo(str(action))
        return
    if not (status or processor):
        raise click.UsageError(f"give action ids, or --status/--processor to {verb} by filter")
    engine = state.checked_engine
    if processor is not None:
        _check_processor_known(state, engine, processor)
    where = audit.Filter(status or default_status, processor)
    what = "/".join(where.statuses) + (f" {processor}" if processor else "")
    count = matching(engine, where, True)
    if count == 0:
        click.echo(f"no {what} actions to {verb}")
        return
    _confirm(f"{verb} {_plural(count, f'{what} action')}", yes)
    click.echo(f"{past} {_plural(matching(engine, where, False), 'action')}")


def _confirm(change: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        _fail(f"refusing to {change} without confirmation (stdin is not a terminal); "
              "pass --yes")
    if not click.confirm(f"{change[0].upper()}{change[1:]}?"):
        _fail("nothing changed", code=1)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


@main.command()
@click.option("--older-than", callback=_duration, required=True, metavar="DURATION",
              help="Finished longer ago than this, e.g. 30d.")
@click.option("--status", callback=_statuses, default="completed,canceled,failed",
              show_default=True, metavar="S[,S...]", help="Only actions in these statuses.")
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@click.pass_obj
def purge(state: State, older_than: Any, status: tuple[str, ...], dry_run: bool) -> None:
    """Delete old finished actions, in batches of 1000 rows per transaction."""
    engine = state.checked_engine
    if dry_run:
        count = admin.purge(engine, older_than, status, dry_run=True)
        click.echo(f"would purge {_plural(count, 'action')}")
        return
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    if not console.is_terminal:
        count = admin.purge(engine, older_than, status)
    else:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("purging", total=None)
            count = admin.purge(engine, older_than, status, progress=lambda done, total:
                                progress.update(task, completed=done, total=total))
    click.echo(f"purged {_plural(count, 'action')}")


# --- processors and workers --------------------------------------------------------------

@main.command("processors")
@click.option("--import", "imports", multiple=True, metavar="MODULE",
              help="Module that registers processors (repeatable; adds to the config "
              "file's `imports`).")
@_format_option
@click.pass_obj
def processors_cmd(state: State, imports: tuple[str, ...], fmt: str) -> None:
    """Processors registered by the modules of --import and the config file's `imports`,
    with their effective settings (decorator, then config), their pause state, and
    whether a live worker serves each."""
    modules = list(dict.fromkeys([*state.config.imports, *imports]))
    click.echo(f"processors registered by: {', '.join(modules)}" if modules else
               "no modules imported: processors are registered by the modules named with "
               "--import MODULE or `imports` in the config file", err=True)
    queue = _queue(state)
    rows = reports.processors(state.config, imports, engine=queue)
    columns = [c for c in reports.PROCESSOR_COLUMNS if queue is not None or
               c not in reports.QUEUE_COLUMNS]
    emit(rows, columns, fmt)


def _queue(state: State) -> Engine | None:
    """The database, when there is one with the schema to ask (listing processors needs
    none: asking a missing SQLite file would create it)."""
    url = state.engine.url
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
        return None
    try:
        return state.engine if has_schema(state.engine) else None
    except AsyncActionsError:  # no server
        return None


@main.command()
@click.argument("names", nargs=-1, required=True, metavar="PROCESSOR...")
@click.pass_obj
def pause(state: State, names: tuple[str, ...]) -> None:
    """Stop claiming these processors' actions on every worker (within a poll
    interval); running attempts finish, and new actions are still enqueued."""
    _pause_or_resume(state, names, admin.pause, "paused")


@main.command()
@click.argument("names", nargs=-1, required=True, metavar="PROCESSOR...")
@click.pass_obj
def resume(state: State, names: tuple[str, ...]) -> None:
    """Claim these processors' actions again."""
    _pause_or_resume(state, names, admin.resume, "resumed")


def _pause_or_resume(state: State, names: tuple[str, ...],
                     change: Callable[[Connection, str], admin.ProcessorState],
                     past: str) -> None:
    """All names or none: one unknown name changes nothing."""
    engine = state.checked_engine
    registry.import_modules(state.config.imports)
    with engine.begin() as conn:
        done = [change(conn, name) for name in dict.fromkeys(names)]
    for done_state in done:
        click.echo(f"{done_state.name} {past}")




@main.command()
@_format_option
@click.pass_obj
def workers(state: State, fmt: str) -> None:
    """Registered workers: heartbeat age and the number of actions each is running."""
    emit(reports.workers(state.checked_engine), reports.WORKER_COLUMNS, fmt)


@main.command()
@click.option("--max-age", callback=_duration, metavar="DURATION",
              help="Heartbeats older than this are stale (default: half the configured "
              "lease, 30s: three missed heartbeats).")
@click.option("--hostname", metavar="HOST",
              help="Check the workers registered by HOST (default: this host, that is "
              "this container or pod).")
@click.option("--any-host", is_flag=True,
              help="Healthy if any worker anywhere heartbeats (is the queue served at all?).")
@click.pass_obj
def health(state: State, max_age: Any, hostname: str | None, any_host: bool) -> None:
    """Exit 0 if this host's workers heartbeat, 1 if none is registered or one is stale:
    a liveness probe for a worker container."""
    import socket

    if hostname is not None and any_host:
        raise click.UsageError("give --hostname or --any-host, not both")
    limit = max_age if max_age is not None else state.config.worker.lease / 2
    host = None if any_host else hostname or socket.gethostname()
    found = [w for w in audit.workers(state.checked_engine) if host in (None, w.hostname)]
    where = "anywhere" if host is None else f"on {host}"
    if not found:
        _fail(f"unhealthy: no worker registered {where}", code=1)
    stale = [w for w in found if w.heartbeat_age > limit]
    # One hung process makes its container unhealthy; a cluster is served while one is not.
    if stale and (host is not None or len(stale) == len(found)):
        oldest = max(stale, key=lambda w: w.heartbeat_age)
        _fail(f"unhealthy: {_plural(len(stale), 'worker')} {where} with no heartbeat for over "
              f"{format_duration(limit)} ({oldest.id}: last {_ago(oldest.heartbeat_age)})",
              code=1)
    newest = min(found, key=lambda w: w.heartbeat_age)
    click.echo(f"healthy: {_plural(len(found) - len(stale), 'worker')} {where}, last heartbeat "
               f"{_ago(newest.heartbeat_age)}")


def _ago(age: Any) -> str:
    return f"{age.total_seconds():.1f}s ago"


@main.command("schedules")
@_format_option
@click.pass_obj
def schedules_cmd(state: State, fmt: str) -> None:
    """Configured schedules ([schedules.NAME]) and when each fires next."""
    emit(reports.schedules(state.config), reports.SCHEDULE_COLUMNS, fmt)


# --- web ---------------------------------------------------------------------------------

@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; another than loopback needs a token.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True,
              help="Port to listen on.")
@click.option("--read-only", is_flag=True, help="Refuse every change (403).")
@click.pass_obj
def web(state: State, host: str, port: int, read_only: bool) -> None:
    """Serve the dashboard and the HTTP API; the token comes from ASYNCACTIONS_WEB_TOKEN."""
    from .web.access import is_loopback, token_from_env

    token = token_from_env()
    if token is None and not is_loopback(host):
        _fail(f"refusing to serve {host} without a token: set ASYNCACTIONS_WEB_TOKEN, or "
              "listen on 127.0.0.1")
    try:
        import uvicorn

        from .web import create_app
    except ImportError as exc:
        _fail(f"the dashboard needs the web extra ({exc.name} is missing): "
              "pip install 'asyncactions[web]'")
    state.checked_engine  # noqa: B018 - a missing schema is one line here, not a 503 later
    app = create_app(config=state.config, token=token, read_only=read_only)
    click.echo(f"asyncactions web on http://{host}:{port}/ "
               f"({'token required' if token else 'no token: loopback only'}"
               f"{', read-only' if read_only else ''})", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False)
