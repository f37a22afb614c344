"""`python -m bot` is the `wabot` command."""

from bot.cli import app

app()
