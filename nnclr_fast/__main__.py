"""``python -m nnclr_fast``: the environment report and self-check (see nnclr_fast.info)."""

import sys

from nnclr_fast.info import main

sys.exit(main())
