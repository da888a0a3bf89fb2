"""Build tooling that regenerates the data the package ships (embedded corpora, task subsets).

It lives in the source checkout and is not installed: users never need it, and it needs registry
clients (pip, npm, apt) that a user's machine may not have. `chibichat data build` and
scripts/build_tasks.py run it from a checkout.
"""
