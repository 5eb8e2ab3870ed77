"""ttserver's Prometheus metrics (GET /metrics; ttclient/metrics.py has the HTTP and
lifecycle ones both daemons share).

Counted as things happen:

    ttstack_vm_boot_seconds{mode}            boot to `running`, cold or warm (histogram)
    ttstack_warm_template_events_total{event}  hit (a clone started from a template),
                                             miss (none ready: cold boot), build (started)
    ttstack_guest_call_errors_total{transport}  run/push/pull of a VM that failed to reach
                                             it (agent, ssh)

Read from the state database at each scrape (so they are never out of step with it):

    ttstack_envs{state}  ttstack_vms{state}  ttstack_vms_by_image{image}
    ttstack_cpu_reserved / ttstack_cpu_total                   vCPUs
    ttstack_memory_reserved_bytes / ttstack_memory_total_bytes
    ttstack_disk_reserved_bytes / ttstack_disk_total_bytes
    ttstack_forward_ports_used / ttstack_forward_ports_total   host ports of the pool
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ttclient.metrics import DaemonMetrics

MIB = 1 << 20


class ServerMetrics(DaemonMetrics):
    """The shared metrics plus ttserver's; `snapshot()` gives what the scrape-time gauges
    read: {"envs": list of EnvRow, "cfg": ServerConfig, "used": StateDB.used()}."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self.boot_seconds = Histogram(
            "ttstack_vm_boot_seconds", "Seconds from a VM's start to `running` (agent "
            "answers), by boot mode", ["mode"], registry=self.registry,
            buckets=(0.5, 1, 2, 3, 5, 10, 15, 20, 30, 45, 60, 120, 300))
        self.template_events = Counter(
            "ttstack_warm_template_events", "Warm-template hits, misses and builds started",
            ["event"], registry=self.registry)
        self.guest_errors = Counter(
            "ttstack_guest_call_errors", "Commands and file copies that could not reach a "
            "VM, by transport", ["transport"], registry=self.registry)
        for mode in ("cold", "warm"):  # present from the start, at zero
            self.boot_seconds.labels(mode)
        for event in ("hit", "miss", "build"):
            self.template_events.labels(event)
        for transport in ("agent", "ssh"):
            self.guest_errors.labels(transport)
        self.registry.register(_StateCollector(snapshot))


class _StateCollector(Collector):
    """Gauges computed from the state database when Prometheus scrapes."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def describe(self) -> list:
        return []  # unchecked: the families depend on the data

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self.snapshot()
        envs, cfg, used = snap["envs"], snap["cfg"], snap["used"]
        vms = [vm for env in envs for vm in env.vms]
        yield _by("ttstack_envs", "ENVs by state", "state", Tally(e.state for e in envs))
        yield _by("ttstack_vms", "VMs by state", "state", Tally(vm.state for vm in vms))
        yield _by("ttstack_vms_by_image", "VMs by image", "image", Tally(vm.image for vm in vms))
        for name, text, reserved, total in (
                ("cpu", "vCPUs", used["cpu"], cfg.cpu_total),
                ("memory", "memory", used["mem_mib"] * MIB, cfg.mem_total_mib * MIB),
                ("disk", "disk", used["disk_mib"] * MIB, cfg.disk_total_mib * MIB)):
            unit = "" if name == "cpu" else "_bytes"
            yield GaugeMetricFamily(f"ttstack_{name}_reserved{unit}",
                                    f"{text} the VMs on record reserve", value=reserved)
            yield GaugeMetricFamily(f"ttstack_{name}_total{unit}",
                                    f"{text} this server may hand out", value=total)
        ports = sum(1 + len(vm.forwards) for vm in vms if vm.ssh_port)
        yield GaugeMetricFamily("ttstack_forward_ports_used", "Host ports of the forward "
                                "pool held by VMs (SSH and forwards)", value=ports)
        yield GaugeMetricFamily("ttstack_forward_ports_total", "Host ports in the forward "
                                "pool", value=cfg.port_last - cfg.port_first + 1)


def _by(name: str, text: str, label: str, counts: Tally) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, text, labels=[label])
    for key, count in sorted(counts.items()):
        family.add_metric([str(key)], count)
    return family
