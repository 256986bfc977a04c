"""``python -m ditlab <command> ...`` is ``ditlab <command> ...``."""

from ditlab.cli import main

main()
