"""``python -m ditlab <command> ...`` is ``ditlab <command> ...``."""

from ditlab.command import main

main()
