"""The ledger: money, event models, accounts and the journal, the append-only store, migrations."""
