"""`vlmq worker` (also `python -m vlmq.worker`): flags override `VLMQ_*` env vars, which
override the defaults.

Only settings are imported here; the worker's heavy dependencies load when it starts, so
`vlmq --help` works with the base (producer-only) install.
"""

from __future__ import annotations

import asyncio
import difflib
import json
from typing import Annotated, NoReturn

import msgspec
import typer

from vlmq.core import tracing
from vlmq.core.logs import configure
from vlmq.core.settings import SettingsError, parse_pairs
from vlmq.core.tracing import TracingError
from vlmq.worker.settings import WorkerSettings, engine_flags

Opt = typer.Option
app = typer.Typer()
# Unknown --flags are the engine's own (vllm serve / lmdeploy serve names).
ENGINE_FLAGS = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command("worker", context_settings=ENGINE_FLAGS)
def worker(
    ctx: typer.Context,
    engine: Annotated[str | None, Opt(help="fake | vllm | lmdeploy | hf | openai [VLMQ_ENGINE]")] = None,
    model: Annotated[str | None, Opt(help="Model path or HF id [VLMQ_MODEL]")] = None,
    engine_arg: Annotated[
        list[str] | None,
        Opt(
            "--engine-arg",
            "-e",
            help="Engine option key=value, named as the engine names it "
            "(max_num_seqs=16, enforce_eager=true, session_len=8192). Repeatable.",
        ),
    ] = None,
    preset: Annotated[
        str | None,
        Opt(
            help="Engine options measured per model family and GPU: throughput | latency | none; "
            "-e options win [VLMQ_PRESET]"
        ),
    ] = None,
    print_engine_args: Annotated[
        bool, Opt("--print-engine-args", help="Print the engine options the preset and -e give, and exit")
    ] = False,
    kafka_bootstrap: Annotated[str | None, Opt(help="[VLMQ_KAFKA_BOOTSTRAP]")] = None,
    redis_url: Annotated[str | None, Opt(help="[VLMQ_REDIS_URL]")] = None,
    redis_topology: Annotated[
        str | None, Opt(help="single | cluster | sentinel [VLMQ_REDIS_TOPOLOGY]")
    ] = None,
    redis_wait_replicas: Annotated[
        int | None,
        Opt(help="Replicas that must have a result before its Kafka commit [VLMQ_REDIS_WAIT_REPLICAS]"),
    ] = None,
    s3_endpoint_url: Annotated[str | None, Opt(help="[VLMQ_S3_ENDPOINT_URL]")] = None,
    jobs_topic: Annotated[str | None, Opt(help="[VLMQ_JOBS_TOPIC]")] = None,
    dlq_topic: Annotated[str | None, Opt(help="[VLMQ_DLQ_TOPIC]")] = None,
    group_id: Annotated[str | None, Opt(help="Consumer group [VLMQ_GROUP_ID]")] = None,
    max_in_flight: Annotated[
        int | None, Opt(help="Jobs held at once; a few times the engine's max batch [VLMQ_MAX_IN_FLIGHT]")
    ] = None,
    max_images_per_job: Annotated[int | None, Opt(help="[VLMQ_MAX_IMAGES_PER_JOB]")] = None,
    max_image_bytes: Annotated[int | None, Opt(help="[VLMQ_MAX_IMAGE_BYTES]")] = None,
    max_job_bytes: Annotated[
        int | None, Opt(help="All images of one job together [VLMQ_MAX_JOB_BYTES]")
    ] = None,
    image_pool: Annotated[
        str | None,
        Opt(
            help="Where images are decoded: thread | process (vLLM, LMDeploy PyTorch: rendered too) [VLMQ_IMAGE_POOL]"
        ),
    ] = None,
    image_workers: Annotated[
        int | None,
        Opt(help="Processes (or threads) of the image pool; 0 = from the cores [VLMQ_IMAGE_WORKERS]"),
    ] = None,
    min_pixels: Annotated[int | None, Opt(help="Resize floor [VLMQ_MIN_PIXELS]")] = None,
    max_pixels: Annotated[int | None, Opt(help="Resize ceiling [VLMQ_MAX_PIXELS]")] = None,
    allowed_file_roots: Annotated[
        list[str] | None,
        Opt("--allow-file-root", help="Folder file:// images may come from [VLMQ_ALLOWED_FILE_ROOTS]"),
    ] = None,
    result_ttl_s: Annotated[int | None, Opt(help="Redis TTL of job records [VLMQ_RESULT_TTL_S]")] = None,
    max_attempts: Annotated[
        int | None, Opt(help="Deliveries of a job before it fails as poison [VLMQ_MAX_ATTEMPTS]")
    ] = None,
    metrics_host: Annotated[
        str | None,
        Opt(help="Address of /metrics, /healthz, /readyz; 0.0.0.0 in containers [VLMQ_METRICS_HOST]"),
    ] = None,
    metrics_port: Annotated[
        int | None, Opt(help="/metrics, /healthz, /readyz port; 0 = off [VLMQ_METRICS_PORT]")
    ] = None,
    log_format: Annotated[str | None, Opt(help="auto | json | console [VLMQ_LOG_FORMAT]")] = None,
) -> None:
    """Serve jobs from Kafka with an engine, results to Redis. SIGTERM drains and exits 0.

    Any other --flag goes to the engine under its own name, as vllm serve or lmdeploy serve spell it:

    vlmq worker --engine vllm --model /models/qwen2-vl-7b --max-num-seqs 16 --enforce-eager

    vlmq worker --engine lmdeploy --model /models/internvl2_5-8b --tp 1 --session-len 8192
    """
    overrides = {k: v for k, v in locals().items() if k not in ("ctx", "engine_arg", "print_engine_args")}
    _refuse_misspelled(ctx)
    try:
        extra = engine_flags(ctx.args)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if engine_arg or extra:
        overrides["engine_args"] = parse_pairs(engine_arg or []) | extra
    try:
        settings = WorkerSettings.load(overrides)
    except SettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    settings = _with_preset(settings, print_engine_args)
    configure(settings.log_format, settings.log_level)
    try:  # `python -m vlmq.worker` has no root command to do it
        tracing.setup("vlmq-worker")
    except TracingError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        from vlmq.worker.service import serve
    except ImportError as exc:
        typer.echo(
            f"error: the worker needs the `worker` extra ({exc.name} is missing): "
            "pip install 'vlmq[worker]' (plus 'vlmq[vllm]' or 'vlmq[lmdeploy]' for a GPU engine)",
            err=True,
        )
        raise typer.Exit(2) from None

    from vlmq.worker.engines import EngineConfigError
    from vlmq.worker.preprocess import unknown_formats
    from vlmq.worker.video import VIDEO_FORMATS

    if unknown := unknown_formats(settings.image_formats):
        typer.echo(
            f"error: VLMQ_IMAGE_FORMATS names formats Pillow cannot open here: {', '.join(unknown)}", err=True
        )
        raise typer.Exit(2)
    if unknown := sorted(set(settings.video_formats) - set(VIDEO_FORMATS)):
        typer.echo(
            f"error: VLMQ_VIDEO_FORMATS names containers vlmq does not open: {', '.join(unknown)} "
            f"(it takes {', '.join(VIDEO_FORMATS)})",
            err=True,
        )
        raise typer.Exit(2)

    from vlmq.core.retry import CredentialsRefused, InfrastructureError
    from vlmq.worker.engines import check_installed, check_model

    _check_metrics_port(settings.metrics_host, settings.metrics_port)
    try:
        check_installed(settings.engine)
        check_model(settings.engine, settings.model)
        code = asyncio.run(serve(settings))
    except EngineConfigError as exc:
        _fail(str(exc), 2)
    except CredentialsRefused as exc:  # Redis answered: a wrong user or password
        _fail(str(exc), 5)
    except InfrastructureError as exc:  # Kafka or Redis not there at start
        _fail(str(exc), 3)
    raise typer.Exit(code)


def _check_metrics_port(host: str, port: int) -> None:
    """Before the engine loads and the worker joins its group (a rebalance for every other
    worker): a port in use would only fail once it serves."""
    from vlmq.core.ports import cannot_listen

    if port and (why := cannot_listen(host, port)):
        _fail(
            f"cannot serve /metrics on {host}:{port} ({why}): another worker has it? "
            "Give each worker its own --metrics-port (VLMQ_METRICS_PORT), or 0 for none",
            2,
        )


def _with_preset(settings: WorkerSettings, print_only: bool) -> WorkerSettings:
    """The settings with the preset's engine options under the explicit ones; with
    `print_only`, print what was chosen and why, and exit."""
    from vlmq.worker.engines import presets

    # NVML is asked only for an engine with measured presets (it loads the driver).
    measured = any(engine == settings.engine for engine, _, _ in presets.TABLE)
    gib = presets.gpu_memory_gib() if measured and settings.preset != "none" else None
    chosen = presets.resolve(settings.engine, settings.model, settings.preset, settings.engine_args, gib)
    if print_only:
        typer.echo(json.dumps(chosen, indent=2))
        raise typer.Exit(0)
    return msgspec.structs.replace(settings, engine_args=presets.merged(chosen))


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _refuse_misspelled(ctx: typer.Context) -> None:
    """A flag the worker does not know goes to the engine, unless it looks like a typo of
    one the worker knows (`--metric-port`): then say so instead of an engine error."""
    known = [o[2:] for p in ctx.command.params for o in p.opts if o.startswith("--")]
    for arg in ctx.args:
        name = arg[2:].partition("=")[0] if arg.startswith("--") else ""
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.85) if name else []
        if close:
            _fail(f"no such option --{name}: did you mean --{close[0]}? (other --flags go to the engine)", 2)
