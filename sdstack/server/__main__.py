"""`python -m sdstack.server` = `sdstack serve` (usable before the command is registered in sdstack/cli.py)."""

from .cli import serve

serve(prog_name="sdstack serve")
