"""The lifecycle words of VMs and ENVs, as stored in the state DB and shown by the API."""

# VM states
PENDING, BOOTING, RUNNING, FAILED, STOPPED = "pending", "booting", "running", "failed", "stopped"
# ENV states
CREATING, READY, ENV_FAILED, DELETING = "creating", "running", "failed", "deleting"
STOPPING, ENV_STOPPED, STARTING = "stopping", "stopped", "starting"
