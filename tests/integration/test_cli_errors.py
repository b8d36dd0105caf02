"""Every everyday mistake gets one line, the right exit code and no traceback: the real
`vlmq` command against a stopped stack (ports nobody listens on) and against the real one.
Exit codes: 1 failed, 2 usage, 3 unreachable, 4 not found, 5 denied (cli/errors.py)."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest

from tests.helpers import Env, put_images, read_topic, start_worker
from vlmq.deploy.stack import free_port, http_status, redis_bin, wait_until
from vlmq.producer import Client, caption
from vlmq.producer.errors import NotFound
from vlmq.producer.flags import MAX_PROMPT_FILE_BYTES
from vlmq.schemas.codec import decode_job
from vlmq.schemas.job import TextPart

STACK_HINT = 'eval "$(vlmq stack up)"'


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "vlmq.cli", *args],
        env={**os.environ, "COLUMNS": "300", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    return proc


def _dead() -> dict[str, str]:
    """Addresses where nothing listens: the stack is down."""
    return {
        "VLMQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "VLMQ_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "VLMQ_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.mark.parametrize(
    ("args", "service"),
    [
        (("status", "j1"), "Redis"),
        (("cancel", "j1"), "Redis"),
        (("wait", "j1", "--timeout", "1"), "Redis"),
        (("bulk", "watch", "b1"), "Redis"),
        (("bulk", "status", "b1"), "Redis"),
        (("submit", "s3://b/k.jpg"), "Kafka"),
        (("bulk", "submit", "b1", "--s3", "s3://photos/x/"), "S3"),
    ],
)
def test_a_stopped_stack_is_one_line_naming_what_and_where(args: tuple[str, ...], service: str) -> None:
    env = _dead()
    proc = run(*args, env=env)
    assert proc.returncode == 3, proc.stderr
    assert f"cannot reach {service} at" in proc.stderr
    where = {
        "Redis": env["VLMQ_REDIS_URL"],
        "Kafka": env["VLMQ_KAFKA_BOOTSTRAP"],
        "S3": env["VLMQ_S3_ENDPOINT_URL"],
    }
    assert where[service] in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # one line, nothing before it


def test_debug_shows_the_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vlmq.cli", "--debug", "status", "j1"],
        env={**os.environ, **_dead()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize(
    ("setting", "dead", "service"),
    [
        ("VLMQ_KAFKA_BOOTSTRAP", "127.0.0.1:{port}", "Kafka"),
        ("VLMQ_REDIS_URL", "redis://127.0.0.1:{port}/0", "Redis"),
    ],
)
def test_a_worker_facing_a_stopped_service_says_so_and_leaks_nothing(
    e: Env, setting: str, dead: str, service: str
) -> None:
    env = {**e.worker_env(), setting: dead.format(port=free_port())}
    proc = subprocess.run(
        [sys.executable, "-m", "vlmq.worker", "--engine", "fake"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"error: cannot reach {service} at" in proc.stderr and STACK_HINT in proc.stderr
    assert "Traceback" not in proc.stderr and "Unclosed" not in proc.stderr


@pytest.mark.parametrize(("engine", "extra"), [("vllm", "vllm"), ("lmdeploy", "lmdeploy"), ("hf", "hf")])
def test_a_missing_engine_says_which_extra_to_install(engine: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(engine if engine != "hf" else "transformers") is not None:
        pytest.skip(f"{engine} is installed in this venv")
    proc = run("worker", "--engine", engine, "--model", "/models/m", "--metrics-port", "0", env=_dead())
    assert proc.returncode == 2, proc.stderr
    assert f"pip install 'vlmq[{extra}]'" in proc.stderr


def test_a_misspelled_worker_flag_gets_a_did_you_mean() -> None:
    proc = run("worker", "--metric-port", "9400", env=_dead())
    assert proc.returncode == 2
    assert "no such option --metric-port: did you mean --metrics-port?" in proc.stderr


def test_unknown_job_and_batch_are_not_found(e: Env) -> None:
    env = e.worker_env()
    for args, what in [
        (("status", "no-such-job"), "job 'no-such-job' not found"),
        (("wait", "no-such-job", "--timeout", "1"), "job 'no-such-job' not found"),
        (("bulk", "status", f"{e.tag}-nope"), f"batch '{e.tag}-nope' not found"),
        (("bulk", "watch", f"{e.tag}-nope"), f"batch '{e.tag}-nope' not found"),
    ]:
        proc = run(*args, env=env)
        assert proc.returncode == 4 and what in proc.stderr, (args, proc.stderr)
    out = e.tmp / "out.jsonl"
    proc = run("bulk", "export", f"{e.tag}-nope", "-o", str(out), env=env)
    assert proc.returncode == 4 and not out.exists(), proc.stderr  # no empty file for a missing batch


def test_bad_s3_sources_are_refused_with_the_reason(e: Env) -> None:
    env = {**e.worker_env(), "VLMQ_JOBS_TOPIC": e.jobs_topic}
    proc = run("bulk", "submit", "b1", "--s3", f"s3://{e.tag}-no-such-bucket/photos/", env=env)
    assert proc.returncode == 4 and f"bucket '{e.tag}-no-such-bucket' does not exist" in proc.stderr, (
        proc.stderr
    )
    proc = run("bulk", "submit", "b1", "--s3", f"s3://{e.bucket}/empty/", env=env)
    assert proc.returncode == 4 and "nothing was submitted" in proc.stderr, proc.stderr
    proc = run("bulk", "submit", "b1", "--s3", f"{e.bucket}/photos/", env=env)
    assert proc.returncode == 2 and "s3://bucket/prefix" in proc.stderr, proc.stderr


def test_a_bad_image_uri_is_a_usage_error() -> None:
    proc = run("submit", "ftp://host/a.jpg", env=_dead())
    assert proc.returncode == 2 and "unknown URI scheme 'ftp'" in proc.stderr, proc.stderr


@pytest.mark.parametrize("path", ["/home/me/photos/2026/cat-in-the-garden.jpg", "cat.jpg", "./a/b.png"])
def test_a_local_path_is_called_one_with_how_to_pass_it(path: str) -> None:
    """Issue 40: an absolute path was cut to 16 characters and called a "URI scheme"."""
    proc = run("submit", path, env=_dead())
    assert proc.returncode == 2
    line = one_line(proc)
    assert f"{path!r} is a local path, not a URI" in line and "s3://bucket/key" in line, line
    assert "file:///" in line and "scheme" not in line, line


@pytest.mark.parametrize("args", [("status", "j1"), ("worker",)])
def test_a_bad_setting_value_is_one_line_naming_the_variable(args: tuple[str, ...]) -> None:
    proc = run(*args, env={**_dead(), "VLMQ_REDIS_TOPOLOGY": "clsuter"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: invalid setting: Invalid enum value 'clsuter' - at `$.redis_topology` "
        "(VLMQ_REDIS_TOPOLOGY or --redis-topology)"
    ]


async def test_submit_with_kafka_down_leaves_no_record_and_names_the_job(e: Env) -> None:
    env = {**e.worker_env(), "VLMQ_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}
    proc = run("submit", f"s3://{e.bucket}/a.jpg", "--job-id", f"{e.tag}-k", env=env)
    assert proc.returncode == 3 and f"job {e.tag}-k was not submitted" in proc.stderr, proc.stderr
    async with Client(e.kafka, e.redis) as client:
        assert await client.store.get(f"{e.tag}-k") is None  # no orphan `queued` record


def test_waiting_without_a_worker_says_the_job_is_queued(e: Env) -> None:
    env = {**e.worker_env(), "VLMQ_JOBS_TOPIC": e.jobs_topic}
    boto3.client("s3", endpoint_url=e.s3).put_object(Bucket=e.bucket, Key="a.jpg", Body=b"x")
    proc = run("submit", f"s3://{e.bucket}/a.jpg", "--wait", "1", env=env)
    assert proc.returncode == 1 and "still queued: no worker has taken it" in proc.stderr, proc.stderr


def test_schema_export_outside_a_checkout_asks_where(tmp_path: Path) -> None:
    proc = run("schema", "export", cwd=tmp_path)
    assert proc.returncode == 2 and "--out DIR" in proc.stderr
    assert not (tmp_path / "docs").exists()
    assert run("schema", "export", "--out", str(tmp_path / "s"), cwd=tmp_path).returncode == 0


def test_the_demo_without_its_services_is_one_line(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path), "VLMQ_TANSU_BIN": str(tmp_path / "missing-tansu")}  # nothing on PATH
    proc = run("demo", "--state-dir", str(tmp_path / "demo"), env=env)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("\n") <= 3 and "error:" in proc.stderr, proc.stderr


async def test_files_and_jobs_that_are_not_there(e: Env) -> None:
    env = {**e.worker_env(), "VLMQ_JOBS_TOPIC": e.jobs_topic}
    proc = run("cancel", f"{e.tag}-nope", env=env)
    assert proc.returncode == 4 and "not found" in proc.stderr, proc.stderr
    proc = run("bulk", "submit", "b1", "--manifest", str(e.tmp / "missing.jsonl"), env=env)
    assert proc.returncode == 2 and "does not exist" in proc.stderr, proc.stderr
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        await client.submit(caption(f"s3://{e.bucket}/a.jpg", job_id=f"{e.tag}-1", batch_id=e.tag))
    proc = run("bulk", "export", e.tag, "-o", str(e.tmp / "no-such-dir" / "out.jsonl"), env=env)
    assert proc.returncode == 2 and "cannot use" in proc.stderr and "No such file" in proc.stderr, proc.stderr


# -- issue 40 ----------------------------------------------------------------------------


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize(
    "args", [("status", "j1"), ("submit", "s3://b/k.jpg"), ("worker", "--engine", "fake")]
)
@pytest.mark.parametrize(
    ("setting", "value", "fix"),
    [
        ("VLMQ_REDIS_URL", "127.0.0.1:6379/0", "write redis://127.0.0.1:6379/0"),
        ("VLMQ_S3_ENDPOINT_URL", "127.0.0.1:9000", "write http://127.0.0.1:9000"),
    ],
)
def test_a_url_without_its_scheme_is_one_line_with_the_fix(
    args: tuple[str, ...], setting: str, value: str, fix: str
) -> None:
    proc = run(*args, env={**_dead(), setting: value})
    assert proc.returncode == 2
    line = one_line(proc)
    assert line.startswith(f"error: invalid setting: {setting}") and fix in line, line


def test_a_metrics_port_in_use_is_refused_before_joining_the_group(e: Env) -> None:
    """The quickstart's second worker on its --metrics-port 9400: it used to join the group
    (a rebalance for the first) and then die with a 57-line traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run("worker", "--engine", "fake", "--metrics-port", str(port), env=e.worker_env())
    assert proc.returncode == 2
    line = one_line(proc)
    assert f"cannot serve /metrics on 127.0.0.1:{port}" in line and "--metrics-port" in line, line
    assert "worker starting" not in proc.stdout + proc.stderr


README_API = [
    sys.executable,
    "-m",
    "vlmq.cli",
    "api",
    "serve",
    "--model",
    "gpt-4o-mini=Qwen/Qwen2-VL-7B-Instruct",
]


def test_the_readmes_api_command_runs_on_the_local_stack(stack: dict[str, str]) -> None:
    """README: `vlmq api serve --model gpt-4o-mini=Qwen/Qwen2-VL-7B-Instruct` right after
    `eval "$(vlmq stack up)"`; it used to stop in a uvicorn traceback (no files bucket)."""
    port = free_port()
    env = {**os.environ, "COLUMNS": "300", **stack, "VLMQ_FILES_BUCKET": f"files-{uuid.uuid4().hex[:8]}"}
    proc = subprocess.Popen(
        [*README_API, "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(
            lambda: proc.poll() is not None or http_status(f"http://127.0.0.1:{port}/healthz") == 200, "api"
        )
        assert proc.poll() is None, proc.communicate()[0][-3000:]
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "Traceback" not in out, out[-3000:]


def test_api_serve_without_its_bucket_is_one_line(stack: dict[str, str]) -> None:
    bucket = f"files-{uuid.uuid4().hex[:8]}"
    proc = run(
        "api",
        "serve",
        "--model",
        "m",
        env={**stack, "VLMQ_CREATE_BUCKET": "false", "VLMQ_FILES_BUCKET": bucket},
    )
    assert proc.returncode == 4
    line = one_line(proc)
    assert f"files bucket {bucket}" in line and "--create-bucket" in line, line


# -- issue 40, round two -----------------------------------------------------------------


def test_an_openai_engine_with_nothing_behind_it_stops_before_joining_the_group(e: Env) -> None:
    """It used to report ready, take partitions and fail every job with a raw
    ClientConnectorError; now start checks base_url answers (exit 3, with the fix)."""
    dead = f"http://127.0.0.1:{free_port()}/v1"
    proc = run(
        "worker",
        *("--engine", "openai", "--model", "m", "-e", f"base_url={dead}", "-e", "start_timeout_s=1"),
        env=e.worker_env(),
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and f"base_url {dead}" in error[0] and "-e base_url=" in error[0], proc.stderr
    assert (
        "partitions assigned" not in proc.stderr + proc.stdout and "ClientConnectorError" not in proc.stderr
    )


def test_an_openai_server_that_refuses_the_key_is_exit_5(e: Env) -> None:
    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(401)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/v1"
        proc = run(
            "worker", "--engine", "openai", "--model", "m", "-e", f"base_url={base}", env=e.worker_env()
        )
    finally:
        server.shutdown()
    assert proc.returncode == 5, proc.stderr[-2000:]
    assert "refused the key (HTTP 401): give it with -e api_key=" in proc.stderr


@pytest.mark.parametrize("args", [("status", "j1"), ("bulk", "status", "b1"), ("api", "key", "create", "t")])
def test_a_wrong_redis_password_is_exit_5_and_says_so(e: Env, args: tuple[str, ...]) -> None:
    """The README promises 5 for refused credentials; it was 3 and "is it up?"."""
    url = e.redis.replace("redis://", "redis://nobody:wrong@")
    proc = run(*args, env={**e.worker_env(), "VLMQ_REDIS_URL": url})
    assert proc.returncode == 5
    line = one_line(proc)
    assert "refused the credentials" in line and "VLMQ_REDIS_URL" in line and "is it up" not in line, line
    assert "wrong" not in line  # the password is never printed


def test_a_worker_with_a_wrong_redis_password_stops_at_once_with_5(e: Env) -> None:
    url = e.redis.replace("redis://", "redis://nobody:wrong@")
    proc = run("worker", "--engine", "fake", env={**e.worker_env(), "VLMQ_REDIS_URL": url})
    assert proc.returncode == 5, proc.stderr[-2000:]
    assert "error: Redis at redis://nobody:***@" in proc.stderr and "refused the credentials" in proc.stderr
    assert "retrying" not in proc.stderr  # a refused password is not waited out


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("submit", "s3://b/k.jpg", "--labels", ""), "--labels is empty"),
        (("submit", "s3://b/k.jpg", "--labels", " , "), "--labels is empty"),
        (("submit", "s3://b/k.jpg", "--labels", "safe,,nsfw"), "has an empty label"),
        (("bulk", "submit", "b1", "--s3", "s3://b/p/", "--labels", ""), "--labels is empty"),
        (
            ("submit", "s3://b/k.jpg", "-p", "@/no/such/prompt.txt"),
            "prompt file '/no/such/prompt.txt' does not exist",
        ),
        (("bulk", "submit", "b1", "--s3", "s3://b/p/", "-p", "@"), "-p @ needs a file name"),
    ],
)
def test_job_flags_are_checked_before_anything_is_sent(args: tuple[str, ...], says: str) -> None:
    """Empty --labels silently became a caption job; -p @FILE reads the prompt from a file."""
    proc = run(*args, env=_dead())  # checked before any service is asked: a stopped stack is fine
    assert proc.returncode == 2
    assert says in one_line(proc)


async def test_a_prompt_from_a_file(e: Env) -> None:
    env = {**e.worker_env(), "VLMQ_JOBS_TOPIC": e.jobs_topic}
    prompt = e.tmp / "prompt.txt"
    prompt.write_text("Describe the light in this photo.\nOne sentence.\n")
    job_id = f"{e.tag}-p"
    assert (
        run("submit", f"s3://{e.bucket}/a.jpg", "-p", f"@{prompt}", "--job-id", job_id, env=env).returncode
        == 0
    )
    huge = e.tmp / "huge.txt"
    huge.write_bytes(b"x" * (MAX_PROMPT_FILE_BYTES + 1))
    proc = run("submit", f"s3://{e.bucket}/a.jpg", "-p", f"@{huge}", env=env)
    assert proc.returncode == 2 and f"is over {MAX_PROMPT_FILE_BYTES:,} bytes" in one_line(proc)
    (message,) = await read_topic(e, e.jobs_topic, 1)
    job = decode_job(message.value)
    texts = [p.text for m in job.messages for p in m.parts if isinstance(p, TextPart)]
    assert job.job_id == job_id and texts == ["Describe the light in this photo.\nOne sentence."]


async def test_ctrl_c_in_bulk_submit_says_how_to_resume_and_resuming_sends_each_job_once(e: Env) -> None:
    env = {**e.worker_env(), "VLMQ_JOBS_TOPIC": e.jobs_topic, "COLUMNS": "300"}
    manifest = e.tmp / "big.jsonl"
    n = 20_000
    manifest.write_text("".join(f'{{"key": "k{i}", "image": "s3://{e.bucket}/{i}.jpg"}}\n' for i in range(n)))
    args = [*AS_IN_A_SHELL, "-m", "vlmq.cli", "bulk", "submit", e.tag, "--manifest", str(manifest)]
    proc = subprocess.Popen(  # noqa: ASYNC220 - it runs beside this test's polling
        args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        while True:  # until the first chunk is recorded: then Ctrl-C, in the middle
            assert proc.poll() is None, "it finished before it could be interrupted"
            with contextlib.suppress(NotFound):
                if (await client.batch(e.tag)).total:
                    break
            await asyncio.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err + out
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert (
        len(line) == 1 and "interrupted:" in line[0] and "run the same command again to resume" in line[0]
    ), err
    again = run("bulk", "submit", e.tag, "--manifest", str(manifest), env=env)
    assert again.returncode == 0, again.stderr
    sent, skipped = (int(x) for x in re.findall(r"(\d+) sent, (\d+) already sent", again.stderr)[0])
    assert sent + skipped == n and skipped > 0, again.stderr
    assert json.loads(run("bulk", "status", e.tag, "--json", env=env).stdout)["total"] == n


# A terminal's job gets SIGINT; one started in the background (CI) inherits it ignored,
# and Python keeps an inherited SIG_IGN: the child restores the default, then runs.
AS_IN_A_SHELL = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.executable, sys.argv[1:])",
    sys.executable,
]


def test_ctrl_c_while_the_cli_loads_is_one_word_and_130(tmp_path: Path) -> None:
    """Interrupted inside an import (here: the deploy room's), deterministically: a hook
    sends this process SIGINT when that module starts loading."""
    hook = (
        "import builtins, os, signal, runpy\n"
        "real = builtins.__import__\n"
        "def hooked(name, *a, **k):\n"
        "    if name == 'vlmq.deploy.cli':\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = hooked\n"
        "runpy.run_module('vlmq.cli', run_name='__main__')\n"
    )
    proc = subprocess.run(
        [*AS_IN_A_SHELL, "-c", hook, "status", "x"],
        env={**os.environ, **_dead()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 130 and proc.stderr == "interrupted\n", proc.stderr[-2000:]


async def test_bulk_cancel_ends_every_unfinished_job_of_a_batch(e: Env) -> None:
    env = {**e.worker_env(), "VLMQ_JOBS_TOPIC": e.jobs_topic}
    uris = put_images(e, 6, w=64, h=48)
    async with Client(e.kafka, e.redis, topic=e.jobs_topic) as client:
        await client.submit_many(
            [caption(u, job_id=f"{e.tag}-{i}", batch_id=e.tag) for i, u in enumerate(uris)]
        )
    proc = run("bulk", "cancel", e.tag, "--wait", "0", env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"{e.tag}: cancel requested for 6 unfinished jobs" in proc.stderr
    assert "6 end cancelled as workers reach them" in proc.stderr  # no worker runs yet
    start_worker(e, "w", engine="fake")
    wait_until(
        lambda: json.loads(run("bulk", "status", e.tag, "--json", env=env).stdout)["cancelled"] == 6,
        "the six jobs cancelled",
    )
    again = run("bulk", "cancel", e.tag, env=env)
    assert again.returncode == 1 and "nothing to cancel, all 6 jobs had ended" in again.stderr
    missing = run("bulk", "cancel", f"{e.tag}-nope", env=env)
    assert missing.returncode == 4 and "not found" in one_line(missing)


def test_the_dashboard_answers_503_when_redis_is_gone(e: Env) -> None:
    """It answered a JSON 500 (a traceback in its log). A Redis of this test's own, so it
    can be stopped under a running dashboard; at start a dead Redis is exit 3."""
    env = {**e.worker_env(), "COLUMNS": "300"}
    dead = f"redis://127.0.0.1:{free_port()}/0"
    refused = run("dashboard", "--port", str(free_port()), env={**env, "VLMQ_REDIS_URL": dead})
    assert refused.returncode == 3 and f"cannot reach Redis at {dead}" in one_line(refused)

    port, web = free_port(), free_port()
    redis = subprocess.Popen(
        [redis_bin(), "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )
    env["VLMQ_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    dash = subprocess.Popen(
        [sys.executable, "-m", "vlmq.cli", "dashboard", "--port", str(web)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(
            lambda: dash.poll() is not None or http_status(f"http://127.0.0.1:{web}/healthz") == 200,
            "dashboard",
        )
        key = run("api", "key", "create", "ops", "--admin", env=env).stdout.strip()
        redis.kill()
        redis.wait(10)
        health = _get(f"http://127.0.0.1:{web}/healthz", {})
        page = _get(
            f"http://127.0.0.1:{web}/dashboard/batches",
            {"Authorization": f"Bearer {key}", "Accept": "text/html"},
        )
    finally:
        redis.kill()
        dash.terminate()
        log = dash.communicate(timeout=30)[0]
    assert health[0] == 503 and health[1].get("retry-after") == "1"
    assert json.loads(health[2])["error"]["code"] == "unavailable"
    assert page[0] == 503 and "text/html" in page[1]["content-type"] and "Redis is not answering" in page[2]
    assert "Traceback" not in log and "a backend did not answer" in log, log[-3000:]


def _get(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read().decode()
