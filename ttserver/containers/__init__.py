"""The `lxc` engine's runtime: Debian userspaces as containers next to QEMU VMs (issue
[engines]; docs/decisions.md, 83).

A container here is a systemd-nspawn process running an image's root filesystem, read-only
and shared, under an overlay of the container's own (`rootfs`, `nspawn`), in a user
namespace whose root is an unprivileged host uid, in cgroups of its own that limit its
memory, CPU and tasks and that find every process it started (`cgroups`). Commands and
files go in by entering its namespaces (nsenter), with no agent or network; sshd runs in
it for SSH (machines.py), reached through its forwarded port (forwards.py).

machines.py makes them the server's VMs of `lxc:` images (docs/decisions.md, 84).
"""
