#!/usr/bin/env bash
# The test command from the README: set up (idempotent), then run the default suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k bad_input`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh
ruff check .
python3 -m mypy
exec python3 -m pytest -p no:cacheprovider "$@"
