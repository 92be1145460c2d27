"""``python -m refsd``: the ``refsd`` command line (see ``refsd.cli``)."""

import sys

from refsd.cli import main

sys.exit(main())
