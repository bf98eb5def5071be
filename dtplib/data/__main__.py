"""`python -m dtplib.data`: see `dtplib.data.cli`."""

from ..common.cli import run_cli
from .cli import main

run_cli(main, prog="python -m dtplib.data")
