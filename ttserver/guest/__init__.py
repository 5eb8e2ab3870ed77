"""Inside a running VM: the QEMU guest agent and SSH transports, commands and
files per request, the guest's identity, cloud-init seeds."""
