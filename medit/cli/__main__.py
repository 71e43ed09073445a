"""``python -m medit.cli``."""
from medit.cli import main

main()
