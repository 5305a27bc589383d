"""Entry point of the measuring process: ``python -m carbonoffset.core._meter`` (see :mod:`carbonoffset.core.meter`)."""

import sys

from carbonoffset.core.meter import main

if __name__ == "__main__":
    sys.exit(main(sys.argv))
