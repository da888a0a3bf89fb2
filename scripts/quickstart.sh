#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the offline quickstart on the data the package ships.
# Extra args go to `chibichat speedrun` (e.g. --preset micro, --lang ja, --layers iberis, --home DIR); it runs
# in the caller's directory, so a relative --home (or $CHIBICHAT_HOME) means what it does on the command line.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh"
exec "$root/.venv/bin/chibichat" speedrun --preset "${CHIBICHAT_PRESET:-cpu}" "$@"
