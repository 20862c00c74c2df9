"""``python -m vlmkit`` (and ``torchrun -m vlmkit train ...``) runs the command line."""

from vlmkit.cli.main import main

main()
