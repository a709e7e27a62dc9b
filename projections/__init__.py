"""Projections of the ledger: wallet and rental read models, the wallet rules as pure decisions,
the outbox, finance reports and replay."""
