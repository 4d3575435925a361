"""`python -m prefopt`: see prefopt.cli. A tool's integer result is the exit status (a grid with failed runs: 1,
an interrupted one: 130); LightningCLI's commands end with 0 or raise."""

import sys

from prefopt.cli import main

result = main()
sys.exit(result if isinstance(result, int) else 0)
