"""ttserver: the host daemon that turns images into ENVs of real VMs (libvirt + QEMU)."""
