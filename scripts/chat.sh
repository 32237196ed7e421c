#!/usr/bin/env bash
# Set up (once) and chat with the bundled demo model, or with a checkpoint folder given as an argument.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh hub
exec .venv/bin/chatglm chat "$@"
