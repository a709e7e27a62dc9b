"""The `billing` console command and its sub-commands (report, dlq, status)."""
