"""`python -m bench ...` (what `inferq bench ...` runs): the suite's command line."""

import sys

from bench.suite import main

sys.exit(main(sys.argv[1:]))
