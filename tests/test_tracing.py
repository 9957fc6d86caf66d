"""SPEC §8: with opentelemetry-api and a tracer provider, each enqueue records a producer
span whose traceparent is stored in trace_context, and each attempt runs in a consumer
span linked to it, with processor, action id, attempt and outcome. Tested with the SDK's
in-memory exporter; without a provider that records, nothing is stored."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from asyncactions import Worker, admin, init_action, init_actions, processor

from .conftest import Db, drain, wait_until, worker_config, worker_thread

_exporter = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(_exporter))


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The application's tracer provider: the SDK, exporting into memory. (OpenTelemetry
    allows one global provider per process: set once, cleared per test.)"""
    trace.set_tracer_provider(_provider)  # a no-op warning after the first time
    _exporter.clear()
    yield _exporter
    _exporter.clear()


def traceparent_of(span) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def test_an_enqueue_stores_its_producer_spans_traceparent(db: Db, spans) -> None:
    tracer = trace.get_tracer("the application")
    with tracer.start_as_current_span("place order") as parent:
        action = init_action(db.engine, "send_receipt", {"order": 1})
        bulk = init_actions(db.engine, "send_receipt", [{"order": n} for n in range(3)])
    (single, many) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.PRODUCER]
    assert single.parent.span_id == parent.get_span_context().span_id  # in the caller's trace
    assert single.attributes["asyncactions.action_id"] == action.id
    assert admin.get_action(db.engine, action.id).trace_context == traceparent_of(single)
    assert many.attributes["messaging.batch.message_count"] == 3
    assert {admin.get_action(db.engine, a.id).trace_context for a in bulk} == {
        traceparent_of(many)}


def test_each_attempt_runs_in_a_consumer_span_linked_to_its_enqueue(db: Db, spans) -> None:
    @processor("traced", retries=1, retry_interval=timedelta(0))
    def traced(action):
        if action.attempts == 1:
            raise RuntimeError("first attempt fails")
        return "ok"

    action = init_action(db.engine, "traced", {})
    drain(db)
    producer = next(s for s in spans.get_finished_spans() if s.kind == SpanKind.PRODUCER)
    consumers = sorted((s for s in spans.get_finished_spans() if s.kind == SpanKind.CONSUMER),
                       key=lambda s: s.attributes["asyncactions.attempt"])
    assert [(c.attributes["asyncactions.action_id"], c.attributes["asyncactions.attempt"],
             c.attributes["asyncactions.outcome"]) for c in consumers] == [
        (action.id, 1, "retried"), (action.id, 2, "completed")]
    for consumer in consumers:
        assert consumer.attributes["asyncactions.processor"] == "traced"
        assert [link.context.span_id for link in consumer.links] == [
            producer.get_span_context().span_id]


def test_without_a_recording_provider_nothing_is_stored(
        db: Db, monkeypatch: pytest.MonkeyPatch) -> None:
    # An application that never configured a provider: the API's default one.
    monkeypatch.setattr(trace, "get_tracer_provider", trace.ProxyTracerProvider)
    action = init_action(db.engine, "untraced", {})
    assert admin.get_action(db.engine, action.id).trace_context is None


def test_a_provider_named_in_the_environment_a_process_starts_with_is_used(
        tmp_path: Path) -> None:
    """OpenTelemetry's OTEL_PYTHON_TRACER_PROVIDER names a provider to load when the
    application sets none in code: a process started with it stores traceparents, one
    started without it stores none (read once, as the process starts)."""
    enqueue = ("from sqlalchemy import create_engine\n"
               "from asyncactions import admin, init_action, migrate\n"
               "engine = create_engine('sqlite:///' + __import__('sys').argv[1])\n"
               "migrate.upgrade(engine)\n"
               "action = init_action(engine, 'p', {})\n"
               "print(admin.get_action(engine, action.id).trace_context)\n")

    def stored(**env: str) -> str:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        return subprocess.run([sys.executable, "-c", enqueue, str(tmp_path / "queue.db")],
                              env={**environment, **env}, capture_output=True, text=True,
                              check=True, timeout=120).stdout.strip()

    assert stored() == "None"
    traceparent = stored(OTEL_PYTHON_TRACER_PROVIDER="sdk_tracer_provider")
    assert traceparent.startswith("00-") and len(traceparent.split("-")) == 4


def test_a_provider_set_while_a_worker_runs_is_used_from_its_next_claim(
        db: Db, spans, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker looks the tracer up once per claim, not per attempt: an application
    that sets its provider after the worker started gets spans for what it claims next."""
    ran: list[int] = []

    @processor("late_traced")
    def late_traced(action):
        ran.append(action.id)

    monkeypatch.setattr(trace, "get_tracer_provider", trace.ProxyTracerProvider)  # none yet
    with worker_thread(Worker(config=worker_config(db), concurrency=2)) as thread:
        before = init_action(db.engine, "late_traced", {})
        wait_until(lambda: before.id in ran, what="the action enqueued before the provider")
        monkeypatch.undo()  # the application sets its provider
        after = init_action(db.engine, "late_traced", {})
        wait_until(lambda: after.id in ran, what="the action enqueued after it")
    assert not thread.is_alive()
    consumed = [s.attributes["asyncactions.action_id"] for s in spans.get_finished_spans()
                if s.kind == SpanKind.CONSUMER]
    assert consumed == [after.id]
