"""The overview's numbers, from index-friendly statements only: live counts from the
partial indexes on pending and running rows, finished counts from the
(status, finished_at) index over a window, never a scan of the whole table."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, Float, Integer, cast, func, literal, select, text

from ..action import Status
from ..audit import FINAL
from ..schema import NOW, async_action, db_now, elapsed_seconds

t = async_action
WINDOWS = {"1h": (timedelta(hours=1), 30), "6h": (timedelta(hours=6), 36),
           "24h": (timedelta(hours=24), 48)}

# Pending and running rows, each status through its own partial index.
LIVE = (select(t.c.processor, t.c.status, func.count()).where(text("status = 'pending'"))
        .group_by(t.c.processor, t.c.status)
        .union_all(select(t.c.processor, t.c.status, func.count())
                   .where(text("status = 'running'")).group_by(t.c.processor, t.c.status)))
BACKLOG = select(func.count(), func.min(t.c.next_eligible_at),
                 elapsed_seconds(func.min(t.c.next_eligible_at), NOW)).where(
    text("status = 'pending'"), t.c.next_eligible_at <= NOW)


def finished(window: timedelta, buckets: int, dialect: str) -> Any:
    """Finished actions per processor, status and time bucket (0 = the newest)."""
    size = window.total_seconds() / buckets
    ratio = elapsed_seconds(t.c.finished_at, NOW) / literal(size, Float)
    # Ages are not negative, so SQLite's truncating cast floors (it may lack floor()).
    bucket = cast(func.floor(ratio) if dialect == "postgresql" else ratio,
                  Integer).label("bucket")
    return (select(t.c.processor, t.c.status, bucket, func.count())
            .where(t.c.status.in_(FINAL),
                   t.c.finished_at >= db_now(literal(-window.total_seconds(), Float)))
            .group_by(t.c.processor, t.c.status, bucket))


@dataclass
class Overview:
    window: str
    buckets: int
    bucket_seconds: float
    counts: dict[str, int] = field(default_factory=dict)  # by status
    by_processor: dict[str, dict[str, int]] = field(default_factory=dict)
    series: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # completed/failed
    backlog: int = 0
    oldest_age: float | None = None
    backlog_history: list[tuple[float, int, float]] = field(default_factory=list)


def overview(engine: Engine, window: str, history: Any) -> Overview:
    span, buckets = WINDOWS[window]
    result = Overview(window, buckets, span.total_seconds() / buckets,
                      counts={s.value: 0 for s in Status})
    with engine.connect() as conn:
        ended = conn.execute(finished(span, buckets, engine.dialect.name))
        rows = [*conn.execute(LIVE),
                *((p, s, n) for p, s, _, n in _series(ended, result, buckets))]
        count, _, age = conn.execute(BACKLOG).one()
    for processor, status, n in rows:
        result.counts[status] += n
        per = result.by_processor.setdefault(processor, {s.value: 0 for s in Status})
        per[status] += n
    result.backlog, result.oldest_age = count, (max(age, 0.0) if age is not None else None)
    now = time.time()
    if not history or now - history[-1][0] >= 2:
        history.append((now, result.backlog, result.oldest_age or 0.0))
    result.backlog_history = list(history)
    return result


def _series(rows: Any, result: Overview, buckets: int) -> Any:
    """Fill the per-processor time series while passing the rows on."""
    for processor, status, bucket, n in rows:
        series = result.series.setdefault(processor, {"completed": [0] * buckets,
                                                      "failed": [0] * buckets})
        if status in series and 0 <= bucket < buckets:
            series[status][buckets - 1 - bucket] += n  # oldest first, left to right
        yield processor, status, bucket, n


@dataclass
class Bar:
    x: float
    y: float
    width: float
    height: float
    value: int
    kind: str


def bar_chart(series: dict[str, list[int]], width: int = 360,
              height: int = 80) -> tuple[list[Bar], int]:
    """Bars for completed and failed side by side; returns them and the scale's top."""
    n = len(series["completed"])
    top = max([1, *series["completed"], *series["failed"]])
    slot = width / n
    bars = []
    for i in range(n):
        for j, kind in enumerate(("completed", "failed")):
            value = series[kind][i]
            h = height * value / top
            bars.append(Bar(round(i * slot + j * slot / 2, 2), round(height - h, 2),
                            round(slot / 2 - 0.5, 2), round(h, 2), value, kind))
    return bars, top


def line_points(values: list[float], width: int = 360, height: int = 80) -> str:
    """An SVG polyline's points for values sampled evenly, left (oldest) to right."""
    if not values:
        return ""
    values = values if len(values) > 1 else values * 2  # one sample: a flat line
    top = max([*values, 1.0])
    step = width / max(len(values) - 1, 1)
    return " ".join(f"{i * step:.1f},{height - height * v / top:.1f}"
                    for i, v in enumerate(values))
