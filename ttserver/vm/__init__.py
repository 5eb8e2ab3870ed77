"""A VM's life on this host: domain XML, booting (cold or warm), the libvirt
domains, the accelerator probe, tear-down and reconciliation."""
