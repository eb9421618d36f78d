"""``python -m datatrace``: the ``datatrace`` command (:mod:`datatrace.cli`)."""

import sys

from datatrace.cli import main

if __name__ == "__main__":
    sys.exit(main())
