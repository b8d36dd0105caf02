"""The worker's settings: the shared `Connection` plus intake, image and engine knobs.

Defaults here, then `VLMQ_*` env vars, then flags (`WorkerSettings.load`).
"""

from __future__ import annotations

import os
import socket
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from vlmq.core.settings import LEASE_S, Connection

QWEN_MIN_PIXELS = 256 * 28 * 28
QWEN_MAX_PIXELS = 1280 * 28 * 28


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(Connection, kw_only=True):
    # -- identity
    # The Kafka consumer group: workers of one group share the jobs topic's partitions.
    group_id: str = "vlmq-workers"
    # This worker's name in job records, logs and the group (default: host-pid).
    worker_id: str = msgspec.field(default_factory=_default_worker_id)
    # -- the engine
    # fake | vllm | lmdeploy | hf | openai.
    engine: str = "fake"
    # Model path or HF id; the engine's own name for it is what jobs may ask for.
    model: str | None = None
    # Engine options under the engine's own names (max_num_seqs, tp, session_len...).
    engine_args: dict[str, str] = msgspec.field(default_factory=dict)
    # Engine options picked per model family and GPU memory class from measured sweeps
    # (worker/engines/presets.py, docs/performance.md): throughput (backlogs) | latency
    # (online topics) | none (the engine's defaults). engine_args win, key by key. The
    # default stays none until the GPU sweep has measured the presets (docs/performance.md):
    # every GPU figure so far was measured with the engine's own batch settings.
    preset: Literal["throughput", "latency", "none"] = "none"
    # -- flow control
    # Jobs held at once (fetching, decoding, in the engine); a few times the engine batch.
    max_in_flight: int = 64
    # Seconds one job may spend in the engine before it fails with `timeout`.
    job_timeout_s: float = 600.0
    # Deliveries of one job before it fails as `poison` without running (a job that kills
    # its worker each time would otherwise go round the fleet forever).
    max_attempts: int = 3
    # Jobs held beyond max_in_flight while their shard's Redis master is down or short of
    # replicas (each keeps its offset uncommitted; the other shards' jobs keep flowing).
    max_parked: Annotated[int, Meta(ge=0)] = 1024
    # Seconds between re-reads of the Redis topology (each master's replicas): durability
    # follows failovers (docs/operations.md, "Durability").
    durability_check_s: Annotated[float, Meta(gt=0, le=300)] = 5.0
    # Run only jobs submitted through the SDK, the API or the documented enqueue step: a
    # message without a submit record is dead-lettered `not_submitted` (a message whose
    # bytes are not the recorded ones always is, `forged`). Off only where every producer
    # is trusted and publishes straight to Kafka (docs/security.md).
    require_submit_record: bool = True
    # Seconds between heartbeats in Redis (the dashboard's workers page); 3 missed: gone.
    heartbeat_s: Annotated[float, Meta(gt=0, le=300)] = 5.0
    # Seconds a claim holds a running job; renewed every third of it while the job runs. A
    # second delivery waits for the holder; a dead worker's jobs are taken over after this.
    lease_s: float = LEASE_S
    # Seconds between offset commits (only finished prefixes are committed).
    commit_interval_s: float = 1.0
    # Seconds a revoked partition's jobs may finish before they are handed back.
    revoke_grace_s: float = 10.0
    # Seconds SIGTERM waits for in-flight jobs before handing them back.
    drain_timeout_s: float = 30.0
    # How long a starting worker waits for Redis to answer before it stops (exit 3).
    start_wait_s: Annotated[float, Meta(ge=0, le=3600)] = 10.0
    # Kafka group session and poll limits (aiokafka's names).
    session_timeout_ms: int = 10_000
    max_poll_interval_ms: int = 300_000
    # How long the broker may hold a fetch that has no new records (aiokafka's name). Kafka
    # answers a fetch as soon as a record arrives, so this only paces idle polling; tansu
    # holds every fetch to the end, which made it a job's whole added latency at low load:
    # the local stack sets 10 (docs/performance.md).
    fetch_max_wait_ms: Annotated[int, Meta(ge=0)] = 500
    # -- images
    # Images one job may carry.
    max_images_per_job: int = 16
    # Bytes one image may have, checked while fetching.
    max_image_bytes: int = 20 * 1024 * 1024
    # Bytes all images of one job may take together (fetched, before decoding).
    max_job_bytes: int = 64 * 1024 * 1024
    # Decoded pixels one image may have: guards against decompression bombs.
    max_image_pixels: int = 64_000_000
    # The resize floor and ceiling in pixels (Qwen-VL's defaults).
    min_pixels: int = QWEN_MIN_PIXELS
    max_pixels: int = QWEN_MAX_PIXELS
    # Characters of prompt text one job may carry.
    max_prompt_chars: int = 200_000
    # Seconds one S3 request may take.
    s3_timeout_s: float = 10.0
    # Seconds a storage outage is retried before the job fails with `image_fetch_failed`.
    fetch_retry_s: float = 60.0
    # Buckets images may come from; empty: any.
    allowed_buckets: list[str] = msgspec.field(default_factory=list)
    # Folders file:// images may come from; empty: file:// is refused.
    allowed_file_roots: list[str] = msgspec.field(default_factory=list)
    # -- images by URL (worker/web.py: every hop's addresses checked, the connection pinned)
    # Schemes of image URLs: "https" (the default), "http"; empty: no web images at all.
    url_schemes: list[Literal["https", "http"]] = msgspec.field(default_factory=lambda: ["https"])
    # Hosts images may come from (`cdn.example.com`; `.example.com` with its subdomains);
    # empty: any public host.
    url_allowed_hosts: list[str] = msgspec.field(default_factory=list)
    # Networks exempt from the refusal of non-public addresses (an internal CDN: 10.1.0.0/16).
    url_allowed_networks: list[str] = msgspec.field(default_factory=list)
    url_max_redirects: Annotated[int, Meta(ge=0, le=20)] = 3
    url_connect_timeout_s: Annotated[float, Meta(gt=0)] = 5.0
    # Seconds between two reads of a body; and for a whole image (a server that trickles bytes).
    url_read_timeout_s: Annotated[float, Meta(gt=0)] = 10.0
    url_timeout_s: Annotated[float, Meta(gt=0)] = 30.0
    # A CA bundle for https images (a private CA); default: the system's.
    url_ca_file: str | None = None
    # Image formats Pillow may open (its format names; JPEG includes iPhone MPO files);
    # anything else is `image_corrupt`, so a rarely used decoder is never reached.
    image_formats: list[str] = msgspec.field(
        default_factory=lambda: ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF"]
    )
    # Where images are decoded and resized: thread (threads of this process; the engine
    # renders them into its input) or process (a pool of processes; with vLLM, or LMDeploy's
    # PyTorch backend, each also runs the engine's own renderer and the engine gets finished
    # inputs). On an H200 with vLLM 0.26 neither won at every photo size (process 0.92-1.00x
    # the engine fed from memory, threads 0.94-0.98x): vLLM's front end keeps up once images
    # are resized, and the tensors the pool hands over are 8x the pixels. LMDeploy 0.18 with
    # its mp engine: process 0.945-1.05x, threads 0.87-0.93x (docs/performance.md).
    image_pool: Literal["process", "thread"] = "thread"
    # Processes or threads of that pool; 0: CPU cores - 4 processes (the engine's front end
    # and core and this event loop keep a core each), or one thread per core.
    image_workers: Annotated[int, Meta(ge=0)] = 0
    # Bytes of prepared inputs (decoded images or rendered tensors) held at once, from
    # preparing until the engine answers; Qwen-VL's tensors are ~24 MB per image.
    max_render_bytes: Annotated[int, Meta(ge=1)] = 8 * 1024**3
    # Bytes of images being decoded at once, counted at their full size from each header
    # before any pixel is decoded (a 62 KB PNG of 64 megapixels holds ~370 MB while it is
    # decoded and converted); a job holds its largest image's. An image larger than this
    # is decoded alone. 0: no limit.
    max_decode_bytes: Annotated[int, Meta(ge=0)] = 1024**3
    # Jobs being prepared plus jobs waiting inside the engine (its own queue): images are
    # prepared no further ahead of the engine than this.
    engine_waiting_target: Annotated[int, Meta(ge=1)] = 64
    # -- videos (worker/video.py: frames sampled with PyAV, each resized like an image)
    # Videos one job may carry; 0: videos are refused (`unsupported_input`).
    max_videos_per_job: Annotated[int, Meta(ge=0, le=16)] = 1
    # Bytes one video may have, checked while fetching (max_job_bytes bounds the job's total).
    max_video_bytes: Annotated[int, Meta(ge=1)] = 64 * 1024 * 1024
    # Seconds of video one video may have, from its header and again while decoding.
    max_video_s: Annotated[float, Meta(gt=0)] = 600.0
    # Frames sampled from one video at most, and per second when the job does not say.
    max_video_frames: Annotated[int, Meta(ge=2, le=1024)] = 64
    video_fps: Annotated[float, Meta(gt=0, le=60)] = 2.0
    # Each frame's resize floor and ceiling in pixels (Qwen-VL's video defaults are 128 and
    # 768 patches of 28x28; frames are many, so the ceiling here is lower).
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 256 * 28 * 28
    # Containers FFmpeg may open (its demuxer names); anything else is `image_corrupt`.
    video_formats: list[str] = msgspec.field(default_factory=lambda: ["mp4", "mov", "webm", "matroska"])
    # -- precomputed image embeddings (worker/embeds.py; the engine must opt in: vLLM's
    # `-e enable_mm_embeds=true`)
    # Bytes one embeddings file may have (a Qwen2-VL-7B image at the default budget: ~9 MB).
    max_embedding_bytes: Annotated[int, Meta(ge=1)] = 32 * 1024 * 1024
    # -- results
    # Topics a job may name as its `result_topic`; empty: any but the jobs and DLQ topics.
    allowed_result_topics: list[str] = msgspec.field(default_factory=list)
    # -- the result cache (docs/cache.md)
    # Answer a job identical to an earlier one (same image bytes, messages, sampling, model,
    # options...) from the cache, and let identical jobs wait for one that runs.
    cache: bool = True
    # tenant: each tenant (recorded by its submitter) has its own entries; shared: one
    # scope for every job (only where every submitter may see every other's answers).
    cache_scope: Literal["tenant", "shared"] = "tenant"
    # Also cache sampled requests (temperature > 0 without a seed): they then get an
    # earlier sample instead of a new one.
    cache_sampled: bool = False
    # Seconds an answer is served after it was written.
    cache_ttl_s: Annotated[int, Meta(ge=1, le=365 * 24 * 3600)] = 7 * 24 * 3600
    # Entries one scope keeps at most; the oldest go first.
    cache_max_entries: Annotated[int, Meta(ge=1)] = 1_000_000
    # -- operations
    # Port of /metrics, /healthz, /readyz; 0: none.
    metrics_port: int = 9400
    # Address they listen on: 127.0.0.1 keeps them off the network (containers: 0.0.0.0).
    metrics_host: str = "127.0.0.1"
    # auto (console at a terminal, else JSON) | json | console.
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "INFO"

    def max_bytes(self, kind: str) -> int:
        """Bytes one input of `kind` (a MediaRef's kind) may have."""
        return {
            "image": self.max_image_bytes,
            "video": self.max_video_bytes,
            "image_embeds": self.max_embedding_bytes,
        }[kind]

    def pool_workers(self, kind: str) -> int:
        cores = os.cpu_count() or 2
        if self.image_workers > 0:
            return self.image_workers
        return max(1, cores - 4) if kind == "process" else max(2, cores)


def engine_flags(args: list[str]) -> dict[str, str]:
    """Engine flags as `vllm serve` takes them (`--max-num-seqs 16`, `--max-num-seqs=16`,
    `--enforce-eager`) into engine_args: snake_case keys, a flag without a value is "true"."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"unexpected argument {arg!r}: engine options are --name value")
        name, sep, value = arg[2:].partition("=")
        if not sep:
            has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
            value = args[i + 1] if has_value else "true"
            i += has_value
        out[name.replace("-", "_")] = value
        i += 1
    return out
