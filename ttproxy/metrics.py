"""ttproxy's Prometheus metrics (GET /metrics; ttclient/metrics.py has the HTTP and
lifecycle ones both daemons share):

    ttstack_proxy_server_up{server}                  1 when its last health check answered
    ttstack_proxy_server_health_misses{server}       health checks missed in a row
    ttstack_proxy_placed_vms_total{server}           VMs placement sent to each server
    ttstack_proxy_placement_refusals_total           ENVs no set of servers had room for
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ttclient.metrics import DaemonMetrics

from .servers import ServerSet


class ProxyMetrics(DaemonMetrics):
    """The shared metrics plus the proxy's, over `servers`."""

    def __init__(self, servers: ServerSet) -> None:
        super().__init__()
        self.placed = Counter("ttstack_proxy_placed_vms", "VMs placement sent to each "
                              "server", ["server"], registry=self.registry)
        self.refused = Counter("ttstack_proxy_placement_refusals", "ENVs placement found no "
                               "room for", registry=self.registry)
        self.registry.register(_Health(servers))


class _Health(Collector):
    def __init__(self, servers: ServerSet) -> None:
        self.servers = servers

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("ttstack_proxy_server_up", "1 when the server's last health "
                               "check answered", labels=["server"])
        misses = GaugeMetricFamily("ttstack_proxy_server_health_misses", "Health checks "
                                   "the server missed in a row", labels=["server"])
        for m in self.servers:
            up.add_metric([m.address], 1 if m.up else 0)
            misses.add_metric([m.address], m.misses)
        yield up
        yield misses
