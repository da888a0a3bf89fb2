"""`python -m chibichat ...` and `torchrun ... -m chibichat <stage>` enter here."""

from chibichat.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
