"""Poison run: a structure-aware fuzzer of whole Kafka messages and of images, through one
real worker process (fake engine), against tansu, redis-server and moto_server.

Messages start as valid jobs (msgpack or JSON) and are mutated by structure: fields
deleted or retyped (None, bools, negative and 2**70 ints, NaN and infinities, megabyte
strings, unicode and invalid UTF-8, nesting 10,000 deep), ids with every reserved
character, keys that disagree with the body, wrong or missing content-types; then a share
is mutated byte by byte (bit flips, truncation, splices). Images are samples of every
format this Pillow can write, mutated byte by byte (bit flips, truncation, repeated and
zeroed runs, random headers), sent inline as `data:` URIs in otherwise valid jobs, the
worker opening every format Pillow knows. Every 50th message is a plain good job.

Checks: the worker never exits; every message that names its job for certain
(`decode_job`, else `invalid_job_id`) leaves that job terminal, written exactly once;
messages that do not, write no state; every good job succeeds; peak RSS stays under
--max-rss-mib. Exit status 1 otherwise.

    python bench/poison.py --messages 100000 --images 100000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import io
import math
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgspec
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from PIL import Image
from redis.asyncio import Redis

from bench.common import hardware, peak_rss_mib, start_fake_worker, start_stack, write_result
from vlmq.core.state import Queued, StateStore
from vlmq.schemas import keys
from vlmq.schemas.codec import JSON, MSGPACK, decode_job, invalid_job_id, message_digest
from vlmq.schemas.errors import VlmqError
from vlmq.worker.samples import photo

RESERVED = [
    ":",
    "{",
    "}",
    "*",
    "?",
    "[",
    "]",
    " ",
    "\n",
    "/",
    "%",
    "\\",
    "'",
    '"',
    "é",
    "💥",
    "\u202e",
    "\x00",
]
WEIRD: list[Any] = [
    None,
    True,
    False,
    -1,
    0,
    2**31,
    2**63 - 1,
    -(2**63),
    1.5,
    math.nan,
    math.inf,
    -math.inf,
    "",
    [],
    {},
]


class Message(msgspec.Struct):
    key: bytes | None
    value: bytes
    content_type: bytes | None
    good: bool = False  # a plain valid job that must succeed


class Fuzzer:
    def __init__(self, seed: int, tag: str) -> None:
        self.rnd = random.Random(seed)
        self.tag = tag
        self.samples = image_samples(self.rnd)

    def job(self, i: int, image: bytes | None = None) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "text", "text": f"describe {i}"}]
        if image is not None:
            content.insert(
                0, {"type": "image", "uri": "data:image/x;base64," + base64.b64encode(image).decode()}
            )
        job: dict[str, Any] = {
            "job_id": f"{self.tag}-{i}",
            "messages": [{"role": "user", "content": content}],
            "sampling": {"max_tokens": 8},
            "batch_id": f"{self.tag}-b{i % 3}",
        }
        fmt = self.rnd.choice(
            [None, {"type": "choice", "choices": ["a", "b"]}, {"type": "regex", "pattern": "[a-z]+"}]
        )
        if fmt:
            job["response_format"] = fmt
        return job

    def good(self, i: int) -> Message:
        job = self.job(i, photo(64, 48, seed=i))
        return Message(job["job_id"].encode(), msgspec.msgpack.encode(job), MSGPACK, good=True)

    def message(self, i: int) -> Message:
        job = self.job(i)
        for _ in range(self.rnd.choice([1, 1, 1, 2, 3])):
            self.mutate(job)
        return self.encode(job)

    def image_message(self, i: int) -> Message:
        data = mutate_bytes(self.rnd, self.rnd.choice(self.samples), light=True)
        return self.encode(self.job(i, data), mutate=False)

    def mutate(self, obj: dict[str, Any]) -> None:
        """One structural mutation at a random place in the job."""
        parent, key = self._pick(obj)
        op = self.rnd.random()
        if op < 0.15:
            parent.pop(key, None) if isinstance(parent, dict) else None
        elif op < 0.45:
            parent[key] = self.rnd.choice(WEIRD)
        elif op < 0.55:
            parent[key] = "x" * self.rnd.choices([1_000, 50_000, 2_000_000], weights=[90, 9, 1])[0]
        elif op < 0.65:
            parent[key] = nested(self.rnd.choice([10, 40, 200, 5_000]), self.rnd)
        elif op < 0.8:
            obj["job_id"] = self._id()
        elif op < 0.9:
            parent[key] = "".join(self.rnd.choice(RESERVED) for _ in range(self.rnd.randint(1, 40)))
        else:
            obj[self.rnd.choice(["metadata", "deadline", "priority", "model", "result_topic", "v"])] = (
                self.rnd.choice([*WEIRD, {f"k{n}": "v" * n for n in range(100)}, "vlmq.jobs", 10**20 / 3])
            )

    def _pick(self, obj: dict[str, Any]) -> tuple[Any, Any]:
        """A random (container, key) on a path down from the job."""
        parent: Any = obj
        key: Any = self.rnd.choice(list(obj))
        for _ in range(self.rnd.randint(0, 4)):
            child = parent[key]
            if isinstance(child, dict) and child:
                parent, key = child, self.rnd.choice(list(child))
            elif isinstance(child, list) and child:
                parent, key = child, self.rnd.randrange(len(child))
            else:
                break
        return parent, key

    def _id(self) -> str:
        base = f"{self.tag}-m{self.rnd.randrange(10**9)}"
        if self.rnd.random() < 0.5:
            return base  # a valid id, unknown to anyone
        cut = self.rnd.randrange(len(base))
        return base[:cut] + self.rnd.choice(RESERVED) + base[cut:] + "x" * self.rnd.choice([0, 0, 200])

    def encode(self, job: dict[str, Any], mutate: bool = True) -> Message:
        as_json = self.rnd.random() < 0.25
        try:
            value = (msgspec.json.encode if as_json else msgspec.msgpack.encode)(job)
        except (OverflowError, TypeError, ValueError):
            value, as_json = msgspec.json.encode(job), True  # e.g. an int msgpack cannot hold
        except RecursionError:  # deeper than any encoder goes: written out by hand
            depth = 10_000
            value = b'{"job_id": "%s", "deep": %s"x"%s}' % (
                _text(job.get("job_id"))[:100].encode("utf-8", "surrogatepass"),
                b"[" * depth,
                b"]" * depth,
            )
            as_json = True
        if mutate and self.rnd.random() < 0.15:
            value = mutate_bytes(self.rnd, value, light=False)
        content_type: bytes | None = JSON if as_json else MSGPACK
        r = self.rnd.random()
        if r < 0.05:
            content_type = self.rnd.choice(
                [None, b"application/xml", b"\xff\xfe", JSON if not as_json else MSGPACK]
            )
        job_id = job.get("job_id")
        key = job_id.encode("utf-8", "surrogatepass") if isinstance(job_id, str) else None
        if self.rnd.random() < 0.05:
            key = self.rnd.choice([None, b"", b"\xff\xfe", f"{self.tag}-other".encode()])
        return Message(key, value, content_type)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "x"


def nested(depth: int, rnd: random.Random) -> Any:
    inner: Any = "leaf"
    for _ in range(depth):
        inner = [inner] if rnd.random() < 0.5 else {"n": inner}
    return inner


def mutate_bytes(rnd: random.Random, data: bytes, light: bool) -> bytes:
    """Byte-level damage: flips, truncation, repeated or zeroed runs, a random header."""
    b = bytearray(data)
    if not b:
        return bytes(b)
    op = rnd.random()
    if light and op < 0.25:
        return bytes(b)  # intact: the format must still decode
    if op < 0.5:
        for _ in range(rnd.randint(1, 20)):
            b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
    elif op < 0.65:
        del b[rnd.randrange(len(b)) :]
    elif op < 0.75:
        start = rnd.randrange(len(b))
        b[start:start] = b[start : start + rnd.randint(1, 64)] * rnd.randint(2, 20)
    elif op < 0.85:
        start = rnd.randrange(len(b))
        b[start : start + rnd.randint(1, 256)] = bytes(rnd.randint(1, 256))
    else:
        head = rnd.randint(8, 64)
        b[:head] = bytes(rnd.randrange(256) for _ in range(head))
    return bytes(b)


def image_samples(rnd: random.Random) -> list[bytes]:
    """One small image in every format this Pillow can write (several modes for some)."""
    base = Image.open(io.BytesIO(photo(48, 32, seed=rnd.randrange(1000)))).convert("RGB")
    Image.init()
    out = []
    for fmt in sorted(Image.SAVE):
        for mode in ("RGB", "L", "RGBA", "P", "1"):
            buf = io.BytesIO()
            try:
                base.convert(mode).save(buf, fmt)
            except Exception:
                continue
            if 0 < buf.tell() <= 32 * 1024:  # a few writers pad to hundreds of KB: not needed
                out.append(buf.getvalue())
    return out


async def produce(env: dict[str, str], topic: str, messages: list[Message]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=env["VLMQ_KAFKA_BOOTSTRAP"],
        acks="all",
        enable_idempotence=False,
        max_request_size=32 * 1024 * 1024,
        linger_ms=5,
    )
    await producer.start()
    try:
        for start in range(0, len(messages), 500):
            sends = []
            for m in messages[start : start + 500]:
                headers = [("content-type", m.content_type)] if m.content_type is not None else []
                sends.append(await producer.send(topic, m.value, key=m.key, headers=headers))
            await asyncio.gather(*sends)
    finally:
        await producer.stop()


def named_job(m: Message) -> str | None:
    """The job a message names for certain, by the worker's own rules."""
    try:
        return decode_job(m.value, m.content_type).job_id
    except VlmqError:
        return invalid_job_id(m.value, m.key)


async def record_submits(env: dict[str, str], messages: list[Message]) -> None:
    """What a non-Python client's enqueue step records (wire.md), for the first message that
    names each job: that one is its job as submitted; later ones naming it are not (forged)."""
    items: dict[str, Queued] = {}
    for m in messages:
        job_id: str | None
        try:
            job = decode_job(m.value, m.content_type)
            job_id, batch_id = job.job_id, job.batch_id
        except VlmqError:
            job_id, batch_id = invalid_job_id(m.value, m.key), None
        if job_id is not None and job_id not in items:
            items[job_id] = (job_id, batch_id, time.time(), {}, message_digest(m.value, m.content_type))
    store = StateStore(Redis.from_url(env["VLMQ_REDIS_URL"]))
    queued = list(items.values())
    for start in range(0, len(queued), 2000):
        await store.enqueue_many(queued[start : start + 2000])
    await store.redis.aclose()


async def wait_terminal(
    store: StateStore, ids: list[str], worker: subprocess.Popen[bytes], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    left = ids
    while left and time.monotonic() < deadline and worker.poll() is None:
        got = []
        for start in range(0, len(left), 2000):
            got += await store.get_many(left[start : start + 2000])
        left = [j for j, r in zip(left, got, strict=True) if r is None or not r.state.terminal]
        if left:
            await asyncio.sleep(1)


async def verify(env: dict[str, str], messages: list[Message], names: list[str | None]) -> dict[str, Any]:
    """`names`: `named_job` of each message, decoded once by the caller."""
    redis = Redis.from_url(env["VLMQ_REDIS_URL"])
    store = StateStore(redis)
    named = {j for j in names if j is not None}
    unnamed_keys = {
        k
        for m, j in zip(messages, names, strict=True)
        if j is None and m.key and (k := m.key.decode("utf-8", "replace")) not in named
    }
    ids = sorted(named)
    results, writes = [], []
    for start in range(0, len(ids), 2000):
        chunk = ids[start : start + 2000]
        results += await store.get_many(chunk)
        pipe = redis.pipeline(transaction=False)
        for j in chunk:
            pipe.hget(keys.job_key(j), "terminal_writes")
        writes += await pipe.execute()
    codes = collections.Counter(
        (r.error.code.value if r.error else r.state.value)
        for r in results
        if r is not None and r.state.terminal
    )
    good = {m.key.decode() for m in messages if m.good and m.key}
    good_results = await store.get_many(sorted(good))
    stray = await store.get_many(sorted(unnamed_keys)) if unnamed_keys else []
    await redis.aclose()
    return {
        "named_jobs": len(ids),
        "non_terminal": sum(r is None or not r.state.terminal for r in results),
        "duplicate_terminal_writes": sum(int(w or 0) > 1 for w in writes),
        "unnamed_messages_that_wrote_state": sum(r is not None for r in stray),
        "good_jobs": len(good),
        "good_jobs_not_succeeded": sum(r is None or r.state.value != "succeeded" for r in good_results),
        "outcomes": dict(codes.most_common()),
    }


def start_worker(env: dict[str, str], topic: str, log: Path) -> subprocess.Popen[bytes]:
    Image.init()
    return start_fake_worker(
        env,
        topic,
        log,
        log_level="ERROR",
        min_pixels=str(28 * 28 * 4),
        max_pixels=str(28 * 28 * 64),
        max_in_flight="128",
        image_formats=",".join(sorted(Image.OPEN)),  # every decoder Pillow has, not only ours
    )


def build(args: argparse.Namespace, tag: str) -> list[Message]:
    fz = Fuzzer(args.seed, tag)
    out: list[Message] = []
    for i in range(args.messages + args.images):
        if i % 50 == 0:
            out.append(fz.good(i))
        elif i < args.messages:
            out.append(fz.message(i))
        else:
            out.append(fz.image_message(i))
    random.Random(args.seed).shuffle(out)
    return out


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000, help="fuzzed whole messages")
    ap.add_argument("--images", type=int, default=100_000, help="jobs with one fuzzed image each")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--max-rss-mib", type=int, default=1536)
    ap.add_argument("--timeout-s", type=float, default=3600)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--name", default="poison")
    args = ap.parse_args()
    tag = f"poison-{int(time.time())}"
    tmp = Path(tempfile.mkdtemp(prefix="vlmq-poison-"))
    t0 = time.perf_counter()
    messages = await asyncio.to_thread(build, args, tag)
    print(f"built {len(messages)} messages in {time.perf_counter() - t0:.1f}s", flush=True)
    stack, env = await asyncio.to_thread(start_stack)
    worker = None
    try:
        admin = AIOKafkaAdminClient(bootstrap_servers=env["VLMQ_KAFKA_BOOTSTRAP"])
        await admin.start()
        await admin.create_topics([NewTopic(tag, args.partitions, 1), NewTopic(f"{tag}.dlq", 1, 1)])
        await admin.close()
        worker = start_worker(env, tag, tmp / "worker.log")
        t1 = time.perf_counter()
        await record_submits(env, messages)
        await produce(env, tag, messages)
        names = [named_job(m) for m in messages]
        named = sorted({j for j in names if j is not None})
        store = StateStore(Redis.from_url(env["VLMQ_REDIS_URL"]))
        await wait_terminal(store, named, worker, args.timeout_s)
        await store.redis.aclose()
        wall = time.perf_counter() - t1
        exited = worker.poll()
        rss = peak_rss_mib(worker.pid) if exited is None else -1
        report = await verify(env, messages, names)
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(120)
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        stack.down()
    report |= {"worker_exits": int(exited is not None), "exit_code_on_sigterm": code, "peak_rss_mib": rss}
    bad = (
        report["worker_exits"]
        + report["non_terminal"]
        + report["duplicate_terminal_writes"]
        + report["unnamed_messages_that_wrote_state"]
        + report["good_jobs_not_succeeded"]
        + int(code != 0)
        + int(rss > args.max_rss_mib or rss < 0)
    )
    total = len(messages)
    print(" | ".join(f"{k}: {v}" for k, v in report.items() if k != "outcomes"), flush=True)
    write_result(
        args.name,
        "messages handled with every invariant kept",
        total,
        total if not bad else total - bad,
        {**vars(args), "device": hardware()},
        messages=args.messages,
        images=args.images,
        image_formats=len(Fuzzer(args.seed, tag).samples),
        wall_s=round(wall, 1),
        messages_per_s=round(total / wall, 1),
        log=str(tmp / "worker.log"),
        **report,
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
