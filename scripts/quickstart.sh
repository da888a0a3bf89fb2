#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the offline quickstart on the data the package ships.
# Extra args go to `chibichat speedrun` (e.g. --preset micro, --lang ja, --layers iberis, --home DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/chibichat speedrun --preset "${CHIBICHAT_PRESET:-cpu}" "$@"
