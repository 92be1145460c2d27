"""``python -m refsd_validate``: the ``refsd-validate`` command line."""

import sys

from refsd_validate.cli import main

sys.exit(main())
