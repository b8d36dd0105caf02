"""deploy/ is checked against the code: settings exist, flags exist, timeouts fit."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer.main
import yaml

from vlmq.producer.cli import app
from vlmq.worker.settings import WorkerSettings

DEPLOY = Path(__file__).parent.parent / "deploy"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kind(kind: str, path: Path) -> dict[str, Any]:
    return next(d for d in _docs(path) if d["kind"] == kind)


def _worker_flags() -> set[str]:
    worker = typer.main.get_command(app).commands["worker"]  # type: ignore[attr-defined]
    return {o for p in worker.params for o in p.opts}


def _vlmq_env(env: dict[str, str]) -> dict[str, str]:
    return {k: str(v) for k, v in env.items() if k.startswith("VLMQ_")}


def _settings_from(env: dict[str, str], monkeypatch: Any) -> WorkerSettings:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return WorkerSettings.load()


def test_every_vlmq_variable_is_a_real_setting_and_converts(monkeypatch: Any) -> None:
    fields = {f"VLMQ_{n.upper()}" for n in WorkerSettings.__struct_fields__}
    config = _vlmq_env(_kind("ConfigMap", DEPLOY / "k8s" / "config.yaml")["data"])
    secret = _vlmq_env(_kind("Secret", DEPLOY / "k8s" / "config.yaml")["stringData"])
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    worker_env = _vlmq_env({k: re.sub(r"\$\{[A-Z_]+:-(.*)\}", r"\1", str(v))
                            for k, v in compose["services"]["worker"]["environment"].items()})
    for env in (config | secret, worker_env):
        assert set(env) <= fields, set(env) - fields
        _settings_from({k: v for k, v in env.items() if v}, monkeypatch)


def test_container_args_are_real_worker_flags() -> None:
    flags = _worker_flags()
    for path in (DEPLOY / "k8s" / "worker.yaml", DEPLOY / "k8s" / "tp2" / "worker.yaml"):
        container = _kind("Deployment", path)["spec"]["template"]["spec"]["containers"][0]
        for arg in container["args"]:
            assert arg.split("=", 1)[0] in flags, (path.name, arg)


def test_stop_timeouts_outlast_the_drain() -> None:
    drain = float(_kind("ConfigMap", DEPLOY / "k8s" / "config.yaml")["data"]["VLMQ_DRAIN_TIMEOUT_S"])
    pod = _kind("Deployment", DEPLOY / "k8s" / "worker.yaml")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > drain + 10
    tp2 = _kind("Deployment", DEPLOY / "k8s" / "tp2" / "worker.yaml")["spec"]["template"]["spec"]
    tp2_drain = float(next(e["value"] for e in tp2["containers"][0]["env"]
                           if e["name"] == "VLMQ_DRAIN_TIMEOUT_S"))
    assert tp2["terminationGracePeriodSeconds"] > tp2_drain + 10
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["worker"]
    assert int(compose["stop_grace_period"].rstrip("s")) > float(compose["environment"]["VLMQ_DRAIN_TIMEOUT_S"]) + 10


def test_scaling_watches_the_workers_group_and_topic_within_the_partitions() -> None:
    config = _kind("ConfigMap", DEPLOY / "k8s" / "config.yaml")["data"]
    so = _kind("ScaledObject", DEPLOY / "k8s" / "scaledobject.yaml")["spec"]
    meta = so["triggers"][0]["metadata"]
    assert (meta["consumerGroup"], meta["topic"]) == (config["VLMQ_GROUP_ID"], config["VLMQ_JOBS_TOPIC"])
    assert so["scaleTargetRef"]["name"] == _kind("Deployment", DEPLOY / "k8s" / "worker.yaml")["metadata"]["name"]
    assert so["minReplicaCount"] == 0
    init = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["kafka-init"]["command"][0]
    partitions = int(re.search(r"vlmq\.jobs:(\d+)", init).group(1))  # type: ignore[union-attr]
    assert so["maxReplicaCount"] <= partitions
    tp2 = _kind("Deployment", DEPLOY / "k8s" / "tp2" / "worker.yaml")["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in tp2["containers"][0]["env"]}
    meta2 = _kind("ScaledObject", DEPLOY / "k8s" / "tp2" / "scaledobject.yaml")["spec"]["triggers"][0]["metadata"]
    assert (meta2["consumerGroup"], meta2["topic"]) == (env["VLMQ_GROUP_ID"], env["VLMQ_JOBS_TOPIC"])


def test_image_health_check_uses_the_metrics_port() -> None:
    dockerfile = (DEPLOY / "docker" / "worker.Dockerfile").read_text()
    port = re.search(r"VLMQ_METRICS_PORT=(\d+)", dockerfile).group(1)  # type: ignore[union-attr]
    assert f"127.0.0.1:{port}/healthz" in dockerfile
    pod = _kind("Deployment", DEPLOY / "k8s" / "worker.yaml")["spec"]["template"]["spec"]
    assert pod["containers"][0]["ports"][0]["containerPort"] == int(port)
