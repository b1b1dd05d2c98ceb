#!/usr/bin/env bash
# Set up (scripts/setup.sh) and train a draft for the embedded default target (SmolLM2-135M-Instruct):
# answer the bundled prompts with the target, build the draft vocab, train online, evaluate on held-out prompts.
set -euo pipefail
. "$(dirname "$0")/setup.sh"
specforge train "$@"
