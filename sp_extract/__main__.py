"""``python -m sp_extract`` runs the command-line interface."""

from .cli import main

main()
