"""Render rows for people (a rich table) or for pipes (JSON lines, CSV).

Rows hold plain Python values; each format decides how a value reads: a table shows
`timedelta(seconds=95)` as `1m 35s` and a Ratio as `97.5%`, JSON and CSV carry
seconds and fractions that programs can compute with.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

FORMATS = ("table", "json", "csv")


class Ratio(float):
    """A fraction from 0 to 1, shown as a percentage in tables."""


def human_duration(value: timedelta) -> str:
    """95.2 s -> '1m 35s': two units at most, enough to read at a glance."""
    seconds = max(value.total_seconds(), 0.0)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def _plain(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal | UUID):
        return str(value)
    return value


def json_row(row: dict[str, Any], columns: Sequence[str] | None = None) -> dict[str, Any]:
    """A row as the JSON formats carry it: times as ISO 8601, durations as seconds."""
    return {c: _plain(row.get(c)) for c in (row if columns is None else columns)}


def _csv_cell(value: Any) -> Any:
    value = _plain(value)
    return json.dumps(value, default=str) if isinstance(value, dict | list) else value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, timedelta):
        return human_duration(value)
    if isinstance(value, Ratio):
        return f"{value * 100:.1f}%"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ", ".join(value)
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


def emit(rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: str = "table",
         title: str | None = None) -> None:
    if fmt == "json":
        for row in rows:
            sys.stdout.write(json.dumps(json_row(row, columns), default=str) + "\n")
    elif fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_cell(row.get(c)) for c in columns])
    else:
        from rich.console import Console  # only tables need rich: keep other commands quick
        from rich.table import Table

        table = Table(title=title, show_lines=False)
        for column in columns:
            table.add_column(column, overflow="fold")  # wrap, never hide behind "…"
        for row in rows:
            table.add_row(*(_cell(row.get(c)) for c in columns))
        console = Console()
        if not console.is_terminal:  # piped to a file or a pager: no width to fit
            console = Console(width=100_000)
        console.print(table)
