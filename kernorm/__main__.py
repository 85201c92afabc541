"""`python -m kernorm`: the same as the `kernorm` command."""

from kernorm.cli import main

main()
