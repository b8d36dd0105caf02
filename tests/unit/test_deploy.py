"""deploy/ is checked against the code: settings exist, flags exist, timeouts fit."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer.core
import typer.main
import yaml

from vlmq.cli import app
from vlmq.worker.settings import WorkerSettings

DEPLOY = Path(__file__).parents[2] / "deploy"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kind(kind: str, path: Path) -> dict[str, Any]:
    return next(d for d in _docs(path) if d["kind"] == kind)


def _worker_flags() -> set[str]:
    root = typer.main.get_command(app)
    assert isinstance(root, typer.core.TyperGroup)
    worker = root.commands["worker"]
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
    worker_env = _vlmq_env(
        {
            k: re.sub(r"\$\{[A-Z_]+:-(.*)\}", r"\1", str(v))
            for k, v in compose["services"]["worker"]["environment"].items()
        }
    )
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
    tp2_drain = float(
        next(e["value"] for e in tp2["containers"][0]["env"] if e["name"] == "VLMQ_DRAIN_TIMEOUT_S")
    )
    assert tp2["terminationGracePeriodSeconds"] > tp2_drain + 10
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["worker"]
    assert (
        int(compose["stop_grace_period"].rstrip("s"))
        > float(compose["environment"]["VLMQ_DRAIN_TIMEOUT_S"]) + 10
    )


def test_scaling_watches_the_workers_group_and_topic_within_the_partitions() -> None:
    config = _kind("ConfigMap", DEPLOY / "k8s" / "config.yaml")["data"]
    so = _kind("ScaledObject", DEPLOY / "k8s" / "scaledobject.yaml")["spec"]
    meta = so["triggers"][0]["metadata"]
    assert (meta["consumerGroup"], meta["topic"]) == (config["VLMQ_GROUP_ID"], config["VLMQ_JOBS_TOPIC"])
    assert (
        so["scaleTargetRef"]["name"]
        == _kind("Deployment", DEPLOY / "k8s" / "worker.yaml")["metadata"]["name"]
    )
    assert so["minReplicaCount"] == 0
    init = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["kafka-init"]["command"][0]
    found = re.search(r"vlmq\.jobs:(\d+)", init)
    assert found is not None
    partitions = int(found.group(1))
    assert so["maxReplicaCount"] <= partitions
    tp2 = _kind("Deployment", DEPLOY / "k8s" / "tp2" / "worker.yaml")["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in tp2["containers"][0]["env"]}
    meta2 = _kind("ScaledObject", DEPLOY / "k8s" / "tp2" / "scaledobject.yaml")["spec"]["triggers"][0][
        "metadata"
    ]
    assert (meta2["consumerGroup"], meta2["topic"]) == (env["VLMQ_GROUP_ID"], env["VLMQ_JOBS_TOPIC"])


def test_image_health_check_uses_the_metrics_port() -> None:
    dockerfile = (DEPLOY / "docker" / "worker.Dockerfile").read_text()
    found = re.search(r"VLMQ_METRICS_PORT=(\d+)", dockerfile)
    assert found is not None
    port = found.group(1)
    assert f"127.0.0.1:{port}/healthz" in dockerfile
    pod = _kind("Deployment", DEPLOY / "k8s" / "worker.yaml")["spec"]["template"]["spec"]
    assert pod["containers"][0]["ports"][0]["containerPort"] == int(port)


def test_images_copy_every_packaged_room() -> None:
    """`pip install .` in an image needs every module of every room pyproject.toml packages:
    each room is copied whole, or each of its modules by name."""
    import tomllib

    root = DEPLOY.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())
    rooms = {folder.split("/")[0] for folder in project["tool"]["setuptools"]["package-dir"].values()}
    for name in ("worker.Dockerfile", "producer.Dockerfile"):
        text = (DEPLOY / "docker" / name).read_text()
        for room in rooms:
            if f"COPY {room} ./{room}" in text:
                continue
            missing = [str(p.relative_to(root)) for p in (root / room).glob("*.py")]
            missing = [m for m in missing if m not in text]
            assert not missing, f"{name} does not copy {missing}"
