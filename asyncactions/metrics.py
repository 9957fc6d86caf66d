"""Prometheus metrics of one worker process (served with `worker --metrics-port`).

Each worker has its own registry, so several Workers in one process (tests) do not
collide; counters are cheap enough to update on every action.
"""

from __future__ import annotations

import time
from collections import Counter as Counter_
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .errors import ConfigError
from .outcomes import Outcome


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.processed = Counter(
            "asyncactions_actions_processed", "Attempts finished, by processor and outcome "
            "(completed, retried, deferred, failed).", ["processor", "outcome"],
            registry=self.registry)
        self.duration = Histogram(
            "asyncactions_attempt_duration_seconds", "Time a processor call took.",
            ["processor"], registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300))
        self.claimed = Counter("asyncactions_actions_claimed", "Actions claimed.",
                               ["processor"], registry=self.registry)
        # What a long transaction pinning vacuum slows down first (see the README).
        self.claim_duration = Histogram(
            "asyncactions_claim_duration_seconds", "Time a claim's transaction took.",
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
        self.pending = Gauge("asyncactions_pending_actions",
                             "Eligible pending actions, by processor (sampled).",
                             ["processor"], registry=self.registry)
        self.oldest_pending = Gauge(
            "asyncactions_oldest_pending_age_seconds",
            "How long the oldest eligible pending action has waited (sampled).",
            ["processor"], registry=self.registry)
        self._children: dict[tuple[Any, ...], Any] = {}
        self._last_heartbeat = time.monotonic()
        Gauge("asyncactions_worker_heartbeat_age_seconds",
              "Seconds since this worker's last successful heartbeat.",
              registry=self.registry).set_function(
                  lambda: time.monotonic() - self._last_heartbeat)

    def serve(self, port: int) -> None:
        try:
            start_http_server(port, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"--metrics-port {port}: cannot serve metrics there "
                              f"({exc.strerror}); choose a free port") from None

    def attempt(self, processor: str, seconds: float) -> None:
        self._child(self.duration, processor).observe(seconds)

    def processed_outcomes(self, outcomes: Iterable[Outcome]) -> None:
        """Counted per written batch: one increment per processor and outcome."""
        for (processor, kind), count in Counter_((o.action.processor, o.kind)
                                                 for o in outcomes).items():
            self._child(self.processed, processor, kind).inc(count)

    def claim(self, seconds: float) -> None:
        self.claim_duration.observe(seconds)

    def claimed_actions(self, processor: str, count: int) -> None:
        self._child(self.claimed, processor).inc(count)

    def _child(self, metric: Any, *labels: str) -> Any:
        """metric.labels(...) looked up once: on every action it would cost more than the
        action's own bookkeeping."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def heartbeat(self) -> None:
        self._last_heartbeat = time.monotonic()

    def backlog(self, rows: Iterable[tuple[str, int, float]], processors: Iterable[str]) -> None:
        """Set pending counts and ages; processors with nothing pending read zero."""
        seen = {name: (count, age) for name, count, age in rows}
        for name in processors:
            count, age = seen.get(name, (0, 0.0))
            self.pending.labels(name).set(count)
            self.oldest_pending.labels(name).set(age)
