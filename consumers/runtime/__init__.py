"""The kit every process shares: settings, errors and backoff, metrics, loops, embedded
servers, the runtime file of a data dir, one-line user errors, garbage-collector tuning."""
