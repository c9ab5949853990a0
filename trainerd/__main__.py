"""`python -m trainerd ...` is the `trainerd` command."""

from trainerd.cli import main

main()
