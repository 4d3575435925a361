"""`python -m prefopt`: see prefopt.cli."""

from prefopt.cli import run

run()
