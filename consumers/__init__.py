"""Adapters: JetStream subscribers, admission replies, outbox relay, HTTP API, Stripe intake, CLI,
embedded servers. Adapters do I/O around the deciders and never compute money themselves."""
