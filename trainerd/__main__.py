"""`python -m trainerd ...` is the `trainerd` command."""

from .cli import main

main()
