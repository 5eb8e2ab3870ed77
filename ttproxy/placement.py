"""Where the VMs of a new ENV go: pure logic, so it is tested without servers.

Policy (docs/decisions.md #32): VM by VM, in image order, each goes to the server that has
the image and the most free memory left (then most free vCPUs, then the order of
--server-set), counting what this ENV already placed. Memory first because it is what
runs out on a host full of TCG guests; spreading evens the load and lets one ENV span
servers when no single one can hold it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class PlacementError(Exception):
    """The VMs do not fit on the servers that are up; the message says what is free where."""
    pass


@dataclass
class Capacity:
    """One up server as its /status describes it."""

    address: str
    images: dict[str, int]  # image full name -> size in MiB (disk a clone needs at least)
    cpu_free: int
    mem_free_mib: int
    disk_free_mib: int
    order: int = 0

    @classmethod
    def from_status(cls, address: str, status: dict, order: int = 0) -> Capacity:
        """The capacity of the server at `address` from its /status dict: free vCPUs, memory
        and disk (MiB), and its images' sizes (MiB)."""
        return cls(address=address,
                   images={i["name"]: int(i.get("size_mib", 0)) for i in status["images"]},
                   cpu_free=status["cpu_total"] - status["cpu_used"],
                   mem_free_mib=status["mem_total_mib"] - status["mem_used_mib"],
                   disk_free_mib=status["disk_total_mib"] - status["disk_used_mib"],
                   order=order)


@dataclass
class Placement:
    """Where an ENV's VMs go: {server address: {image full name: VM count}}, in placement
    order."""

    # address -> image full name -> VM count, in placement order
    parts: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, address: str, image: str) -> None:
        """One more VM of `image` on the server at `address`."""
        per = self.parts.setdefault(address, {})
        per[image] = per.get(image, 0) + 1

    def first_indexes(self) -> dict[str, int]:
        """VM index where each server's part starts, so names are unique across servers."""
        out, start = {}, 0
        for address, counts in self.parts.items():
            out[address] = start
            start += sum(counts.values())
        return out


def place(images: list[str], vm_number: int, cpu: int, mem_mib: int, disk_mib: int | None,
          servers: list[Capacity]) -> Placement:
    """Place `vm_number` VMs of each image; PlacementError says what does not fit where."""
    plan = Placement()
    free = {s.address: [s.mem_free_mib, s.cpu_free, s.disk_free_mib] for s in servers}
    for image in images:
        holders = [s for s in servers if image in s.images]
        if not holders:
            raise PlacementError(f"no server that is up has image {image}")
        def disk(s: Capacity, image: str = image) -> int:  # what the clone takes there
            return max(disk_mib or 0, s.images[image])

        for n in range(vm_number):
            fits = [s for s in holders if free[s.address][0] >= mem_mib
                    and free[s.address][1] >= cpu and free[s.address][2] >= disk(s)]
            if not fits:
                rows = "; ".join(f"{s.address}: cpu {free[s.address][1]}, mem "
                                 f"{free[s.address][0]} MiB, disk {free[s.address][2]} MiB"
                                 for s in holders)
                raise PlacementError(
                    f"cannot place VM {n + 1} of {vm_number} for {image} (needs cpu {cpu},"
                    f" mem {mem_mib} MiB, disk {disk(holders[0])} MiB); free: {rows}")
            best = max(fits, key=lambda s: (free[s.address][0], free[s.address][1], -s.order))
            free[best.address][0] -= mem_mib
            free[best.address][1] -= cpu
            free[best.address][2] -= disk(best)
            plan.add(best.address, image)
    return plan
