"""OpenTelemetry, when the application has it (SPEC §8): each enqueue records a producer
span and stores its W3C `traceparent` in `trace_context`; each attempt runs in a consumer
span linked to it, with the processor, action id, attempt and outcome as attributes.

Without `opentelemetry-api`, or without a tracer provider the application set, nothing
is recorded or stored, and it costs one check per call.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

try:
    from opentelemetry import trace
    from opentelemetry.environment_variables import OTEL_PYTHON_TRACER_PROVIDER
    from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
except ImportError:  # tracing is an optional extra
    trace = None  # type: ignore[assignment]

SYSTEM = "asyncactions"
_tracers: dict[int, Any] = {}  # by provider: asking the API for a tracer is not free
# While no provider is set, the API's get_tracer_provider() looks this variable up in
# os.environ on every call (a KeyError raised and caught twice): a tenth of the CPU an
# enqueue spends on a kept connection (py-spy). Like the rest of the environment a
# process starts with, it is read once, here.
_PROVIDER_IN_ENVIRONMENT = trace is not None and OTEL_PYTHON_TRACER_PROVIDER in os.environ
_UNREADABLE = object()


def _tracer() -> Any:
    """Our tracer from the application's provider, or None when it has none: the API's
    default (proxy or no-op) provider records nothing, and making its spans halved the
    drain rate of no-op actions."""
    if trace is None:
        return None
    # The API's own global, None until a provider is set (were it renamed, the API's
    # lookup below answers).
    if getattr(trace, "_TRACER_PROVIDER", _UNREADABLE) is None and not _PROVIDER_IN_ENVIRONMENT:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    tracer = _tracers.get(id(provider))
    if tracer is None:
        tracer = _tracers[id(provider)] = provider.get_tracer(SYSTEM)
    return tracer


def start_producer(processor: str) -> Any:
    """A producer span for one enqueue (its parent: the caller's current span), or None
    when nothing records."""
    tracer = _tracer()
    if tracer is None:
        return None
    span = tracer.start_span(
        f"{processor} send", kind=SpanKind.PRODUCER,
        attributes={"messaging.system": SYSTEM, "messaging.operation.type": "send",
                    "messaging.destination.name": processor})
    if not span.is_recording():
        span.end()
        return None
    return span


def traceparent(span: Any) -> str | None:
    """The span's W3C traceparent header value."""
    if span is None:
        return None
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def end_producer(span: Any, action_ids: Sequence[int]) -> None:
    if span is None:
        return
    if len(action_ids) == 1:
        span.set_attribute("asyncactions.action_id", action_ids[0])
    span.set_attribute("messaging.batch.message_count", len(action_ids))
    span.end()


def _link(value: str | None) -> Any:
    """A link to the producer span named by a stored traceparent (None if unreadable)."""
    parts = (value or "").split("-")
    if len(parts) != 4 or parts[0] != "00":
        return None
    try:
        ctx = SpanContext(int(parts[1], 16), int(parts[2], 16), is_remote=True,
                          trace_flags=TraceFlags(int(parts[3], 16)))
    except ValueError:
        return None
    return Link(ctx) if ctx.is_valid else None


_OFF = nullcontext()  # the consumer "span" when nothing records: enters as None


def consumer_tracer() -> Any:
    """The tracer for consumer spans, or None when nothing records: looked up once per
    claim, not per attempt (the API's lookup cost a no-op attempt a sixth of its
    executor's time), so a provider set meanwhile is used from the next claim on."""
    return _tracer()


def consuming(tracer: Any, processor: str,
              actions: Sequence[Any]) -> AbstractContextManager[Any]:
    """The consumer span of one attempt (of one action, or of a batch), made with
    `tracer` (consumer_tracer's), linked to the spans that enqueued its actions, as a
    context manager whose value is the span, or None when nothing records (then a
    shared one that costs nothing to enter)."""
    return _OFF if tracer is None else _consuming(tracer, processor, actions)


@contextmanager
def _consuming(tracer: Any, processor: str, actions: Sequence[Any]) -> Iterator[Any]:
    links = [link for link in (_link(a.trace_context) for a in actions) if link is not None]
    attributes: dict[str, Any] = {"messaging.system": SYSTEM,
                                  "messaging.operation.type": "process",
                                  "messaging.destination.name": processor,
                                  "asyncactions.processor": processor}
    if len(actions) == 1:
        attributes.update({"asyncactions.action_id": actions[0].id,
                           "asyncactions.attempt": actions[0].attempts})
    else:
        attributes["asyncactions.action_ids"] = [a.id for a in actions]
    with tracer.start_as_current_span(
            f"{processor} process", kind=SpanKind.CONSUMER, links=links,
            attributes=attributes, record_exception=False,
            set_status_on_exception=False) as span:
        yield span if span.is_recording() else None


def outcome(span: Any, outcomes: Sequence[Any]) -> None:
    """The attempt's outcome on its consumer span (a batch's kinds, joined), and the
    error when one failed."""
    if span is None:
        return
    span.set_attribute("asyncactions.outcome",
                       ",".join(sorted({str(o.kind) for o in outcomes})))
    errors = [o.error for o in outcomes if o.error]
    if errors:
        span.set_status(Status(StatusCode.ERROR, errors[0]))
