"""pytest_ttstack: run pytest suites across an OS matrix of real VMs served by ttstack."""
