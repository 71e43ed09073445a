"""`python -m medit ...`: the same command line as `medit`."""
from medit.cli import main

if __name__ == "__main__":
    main()
