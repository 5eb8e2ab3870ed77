"""The host's resources VMs use: disk storage (qcow2, btrfs, ZFS), the bridge
network, forwarded ports, binfmt_misc for foreign-arch builds."""
