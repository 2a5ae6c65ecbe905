"""python3 -m scistreamd.ctl: the same as the scistreamctl command."""

import sys

from .cli import main

sys.exit(main())
