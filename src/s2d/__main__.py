"""`python -m s2d …`, which is what `torchrun -m s2d finetune …` runs on every rank."""

import sys

from s2d.cli import main

sys.exit(main())
