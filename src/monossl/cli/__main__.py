"""`python -m monossl.cli ...`, the same as `monossl ...`."""

import sys

from monossl.cli import main

sys.exit(main())
