"""`vlmq api`: the OpenAI Files and Batches API (and queue-backed chat completions) over
Kafka, Redis and S3.

The server holds no state: files live in S3, file and batch objects in Redis, the work
goes through Kafka as ordinary vlmq jobs. Any number of replicas serve the same tenants;
the work of driving a batch (validate, submit, finalize, expire) is done by whichever
replica holds that batch's short lease in Redis.

    settings.py  ApiSettings (VLMQ_* / flags)
    objects.py   the OpenAI object shapes (msgspec Structs)
    records.py   the Redis side: keys, tenants, file and batch records, leases
    storage.py   the S3 side: streamed uploads, ranged line reads, deletes
    upload.py    multipart/form-data parsed as it arrives (a 200 MB file never sits in memory)
    driver.py    a batch's lifecycle: validating -> in_progress -> finalizing -> completed ...
    online.py    POST /v1/chat/completions: one online job, waited for, with backpressure
    app.py       the HTTP routes (FastAPI)
    cli.py       `vlmq api serve`, `vlmq api key ...`
"""
