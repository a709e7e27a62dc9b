"""The `billing` console command: ``python -m consumers.cli`` runs it too."""

from consumers.cli.main import main

main()
