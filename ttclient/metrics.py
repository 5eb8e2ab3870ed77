"""Prometheus metrics both daemons serve at GET /metrics (prometheus-client, from the
`[server]`/`[proxy]` extras; the `tt` client never imports this).

Every daemon has its own registry (not the library's global one), so two in one process
(tests) do not collide. Names follow Prometheus' conventions: `ttstack_` namespace, base
units (seconds, bytes), `_total` on counters (added by the library).

    ttstack_http_requests_total{route, method, code}      answered API requests
    ttstack_http_request_duration_seconds{route, method}  their latency (histogram)
    ttstack_env_events_total{event}                       create, delete, stop, start,
                                                          update, kick, expire
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

CONTENT_TYPE = CONTENT_TYPE_LATEST


class DaemonMetrics:
    """The metrics every daemon has; a daemon's own subclass adds its own to `registry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("ttstack_http_requests", "API requests answered, by route "
                                "template, method and HTTP status code",
                                ["route", "method", "code"], registry=self.registry)
        self.latency = Histogram("ttstack_http_request_duration_seconds", "Time to answer an "
                                 "API request (a run's: until its results began)",
                                 ["route", "method"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                                          10, 30, 60, 300))
        self.env_events = Counter("ttstack_env_events", "ENV lifecycle events (what the "
                                  "audit trail logs)", ["event"], registry=self.registry)

    def observe_request(self, route: str, method: str, code: int, seconds: float) -> None:
        """Count one answered request (`route`: its template, e.g. /envs/{name})."""
        self.requests.labels(route, method, str(code)).inc()
        self.latency.labels(route, method).observe(seconds)

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format."""
        return generate_latest(self.registry)
