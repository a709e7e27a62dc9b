"""Stripe: the calls the service makes, the money facts Stripe reports, and the reconciliation."""
