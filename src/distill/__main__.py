"""`python -m distill ...` (also `accelerate launch -m distill train ...`)."""

import sys

from distill.cli import main

sys.exit(main())
