#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite.
set -euo pipefail
. "$(dirname "$0")/setup.sh"
python -m pytest -q tests
