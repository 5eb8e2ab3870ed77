"""Warm clones: memory snapshots (templates) VMs are restored from."""
