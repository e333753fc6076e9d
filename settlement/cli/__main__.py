"""`python -m settlement.cli`: the operator CLI."""

from settlement.cli.main import app

app()
