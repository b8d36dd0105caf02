"""What the SDK and the worker share, and nothing else: the Redis state machine (`state`,
`lua/`), the connection settings (`settings`), logging (`logs`) and the one retry/timeout
helper (`retry`). Imports neither `vlmq.producer` nor `vlmq.worker`."""
