"""One settings object for SDK and worker: defaults, then VLMQ_* env vars, then flags."""

from __future__ import annotations

import ast
import inspect

import msgspec
import pytest

from vlmq.core.settings import RESULT_TTL_S, Connection, SettingsError
from vlmq.producer import Client
from vlmq.worker.settings import WorkerSettings


def test_env_then_flags_with_lists_dicts_and_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMQ_REDIS_URL", "redis://env:6379/1")
    monkeypatch.setenv("VLMQ_MAX_IN_FLIGHT", "12")
    monkeypatch.setenv("VLMQ_ALLOWED_BUCKETS", "a, b,,c")
    monkeypatch.setenv("VLMQ_ENGINE_ARGS", "max_num_seqs=8,enforce-eager")
    s = WorkerSettings.load({"max_in_flight": 20, "model": None})
    assert s.redis_url == "redis://env:6379/1"
    assert s.max_in_flight == 20  # a flag beats the environment; None means "not given"
    assert s.allowed_buckets == ["a", "b", "c"]
    assert s.engine_args == {"max_num_seqs": "8", "enforce_eager": "true"}
    assert s.result_ttl_s == RESULT_TTL_S and s.kafka_bootstrap == "127.0.0.1:9092"


def test_the_sdk_reads_the_same_settings_as_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMQ_KAFKA_BOOTSTRAP", "kafka.example:9093")
    monkeypatch.setenv("VLMQ_JOBS_TOPIC", "jobs-x")
    monkeypatch.setenv("VLMQ_RESULT_TTL_S", "60")
    monkeypatch.setenv("VLMQ_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("VLMQ_KAFKA_SASL_MECHANISM", "PLAIN")
    client = Client(redis_url="redis://arg:6379/0")  # connects lazily: nothing is reached here
    assert client.settings.kafka_bootstrap == "kafka.example:9093"
    assert client.settings.jobs_topic == "jobs-x" and client.store.ttl_s == 60
    assert client.settings.redis_url == "redis://arg:6379/0"  # an argument beats the environment
    assert client.settings.kafka_options()["sasl_mechanism"] == "PLAIN"
    worker = WorkerSettings.load()
    assert msgspec.structs.asdict(client.settings) | {"redis_url": worker.redis_url} == {
        k: v for k, v in msgspec.structs.asdict(worker).items() if k in Connection.__struct_fields__
    }
    given = Client(settings=Connection(jobs_topic="t2"))
    assert given.settings.jobs_topic == "t2" and given.settings.kafka_bootstrap == "127.0.0.1:9092"


def test_logs_never_show_secrets() -> None:
    s = WorkerSettings(
        redis_url="redis://vlmq:hunter2@redis:6379/0",
        kafka_sasl_password="kafka-secret",
        engine_args={
            "api_key": "sk-live-123",
            "base_url": "https://u:p@host/v1",
            "hf-token": "hf_abc",
            "completion_tokens": "1000",
        },
    )
    text = msgspec.json.encode(s.redacted()).decode()
    for secret in ("hunter2", "kafka-secret", "sk-live-123", ":p@", "hf_abc"):
        assert secret not in text
    assert '"completion_tokens":"1000"' in text  # a word that contains "token" is no secret
    assert "redis://vlmq:***@redis:6379/0" in text
    s = WorkerSettings(redis_url="rediss://redis:6380/0?password=hunter3&ssl_cert_reqs=none")
    assert "hunter3" not in msgspec.json.encode(s.redacted()).decode()


@pytest.mark.parametrize("cls", [Connection, WorkerSettings])
def test_every_field_is_documented_where_it_is_declared(cls: type[Connection]) -> None:
    """A comment on the line above each field (or above its group) says what it is."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    tree = ast.parse(source)
    body = tree.body[0]
    assert isinstance(body, ast.ClassDef)
    undocumented = []
    for node in body.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above = [ln.strip() for ln in lines[: node.lineno - 1] if ln.strip()]
            if not above or not (above[-1].startswith("#") or _in_commented_group(lines, node.lineno)):
                undocumented.append(node.target.id)
    assert not undocumented, undocumented


def _in_commented_group(lines: list[str], lineno: int) -> bool:
    """Fields declared one after another under one comment share it."""
    i = lineno - 2
    while i >= 0 and lines[i].strip() and not lines[i].strip().startswith("#"):
        if ":" not in lines[i]:
            return False
        i -= 1
    return i >= 0 and lines[i].strip().startswith("#")


def test_a_bad_setting_value_names_its_env_var_and_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMQ_REDIS_TOPOLOGY", "clsuter")
    with pytest.raises(SettingsError, match=r"'clsuter'.*\(VLMQ_REDIS_TOPOLOGY or --redis-topology\)"):
        Connection.load()
    monkeypatch.delenv("VLMQ_REDIS_TOPOLOGY")
    monkeypatch.setenv("VLMQ_MAX_IN_FLIGHT", "many")
    with pytest.raises(SettingsError, match="VLMQ_MAX_IN_FLIGHT or --max-in-flight"):
        WorkerSettings.load()


@pytest.mark.parametrize(
    ("var", "value"),
    [("VLMQ_ENGINE_WAITING_TARGET", "0"), ("VLMQ_IMAGE_WORKERS", "-1"), ("VLMQ_MAX_RENDER_BYTES", "0")],
)
def test_image_stage_limits_are_bounded(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    """A waiting target of 0 would hold every image job forever: refused at start."""
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=var):
        WorkerSettings.load()
