"""`python -m specdec.evals ...` (or `accelerate launch -m specdec.evals ...`): run the benchmark."""

import sys

from specdec.evals.bench import main

sys.exit(main())
