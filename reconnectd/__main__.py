"""``python -m reconnectd``: the same as the ``reconnectd`` command."""

import sys

from reconnectd.cli import main

sys.exit(main())
