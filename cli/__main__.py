"""`python -m vlmq.cli ...`: the same as `vlmq ...`."""

from vlmq.cli import main

main()
