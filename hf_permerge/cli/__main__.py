"""`python -m hf_permerge.cli ...`, as `hf-permerge ...` (and under `accelerate launch -m`)."""

import sys

from . import main

sys.exit(main())
