"""NATS side of the service: the intake (partition-owned writers), admission replies, the outbox
relay, the contract's subjects and streams, and the nats-py patch that lets any bytes through."""
