"""The bad-input corpus, built by code (no hand-made binaries): every case is a Kafka
message (key = its job id) with the outcome vlmq must give it, and, for images, the objects
to put in S3 first. `python -m tests.corpus.build` prints the table for docs/errors.md.

Worker settings the outcomes assume: CORPUS_SETTINGS below.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vlmq.worker.samples import photo

CORPUS_SETTINGS: dict[str, Any] = {
    "max_images_per_job": 4,
    "max_image_bytes": 300_000,
    "max_job_bytes": 800_000,
    "max_prompt_chars": 100_000,
    "engine_args": "max_model_len=2000,fail_on=EXPLODE",
}
BUCKET = "{bucket}"  # replaced by the test's bucket


@dataclass
class Case:
    """`value` is the message; in it `"job_id": "x"` becomes the case's job id and `{bucket}`
    / `{dlq}` the test's bucket and dead-letter topic. `msgpack`: a message encoded by the
    test instead (for what JSON cannot carry, such as NaN)."""

    name: str
    what: str
    expect: str  # an ErrorCode value, or "succeeded" / "expired"
    value: bytes = b""
    objects: dict[str, bytes] = field(default_factory=dict)
    content_type: bytes | None = None
    stateless: bool = False  # it cannot say for certain which job it is: dead letter only
    msgpack: dict[str, Any] | None = None


def _job(job_id: str, content: Any, **extra: Any) -> bytes:
    return json.dumps(
        {"job_id": job_id, "messages": [{"role": "user", "content": content}], **extra}
    ).encode()


def _img_job(job_id: str, *uris: str) -> bytes:
    return _job(job_id, [*({"type": "image", "uri": u} for u in uris), {"type": "text", "text": "Describe."}])


def _nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"p": schema}}
    return schema


def _save(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_header(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels and holds almost nothing (a header-size bomb)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def image_cases() -> list[tuple[str, str, str, bytes]]:
    """(name, what, expected outcome, object bytes)."""
    base = Image.open(io.BytesIO(photo(160, 120, seed=3))).convert("RGB")
    jpeg, png = _save(base, "JPEG"), _save(base, "PNG")
    frames = [base.convert("P"), base.rotate(90).convert("P")]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    exif = base.getexif()
    exif[0x0112] = 6  # rotate 90 on display
    return [
        ("img-empty", "0-byte object", "image_corrupt", b""),
        ("img-trunc-jpeg", "truncated JPEG (first half)", "image_corrupt", jpeg[: len(jpeg) // 2]),
        ("img-trunc-png", "truncated PNG (first half)", "image_corrupt", png[: len(png) // 2]),
        (
            "img-bomb-png",
            "PNG decompression bomb (20,000×20,000, 1-bit, ~60 KB)",
            "image_too_large",
            _save(Image.new("1", (20_000, 20_000)), "PNG"),
        ),
        (
            "img-60k-header",
            "PNG header claiming 60,000×60,000",
            "image_too_large",
            _png_header(60_000, 60_000),
        ),
        ("img-too-many-bytes", "over max_image_bytes (300 KB)", "image_too_large", jpeg + b"\0" * 320_000),
        ("img-text", "a text file named .jpg", "image_corrupt", b"hello, I am not an image\n"),
        (
            "img-svg",
            "SVG (vector, not supported)",
            "image_corrupt",
            b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
        ),
        (
            "img-html",
            "an HTML error page saved as the object",
            "image_corrupt",
            b"<html><body>403</body></html>",
        ),
        ("img-cmyk", "CMYK JPEG", "succeeded", _save(base.convert("CMYK"), "JPEG")),
        ("img-16bit", "16-bit greyscale PNG", "succeeded", _save(base.convert("L").convert("I;16"), "PNG")),
        ("img-grey", "8-bit greyscale JPEG", "succeeded", _save(base.convert("L"), "JPEG")),
        ("img-1bit", "1-bit PNG", "succeeded", _save(base.convert("1"), "PNG")),
        ("img-palette-alpha", "palette PNG with transparency", "succeeded", _save(pal, "PNG")),
        ("img-rgba", "RGBA PNG", "succeeded", _save(base.convert("RGBA"), "PNG")),
        ("img-la", "greyscale + alpha PNG", "succeeded", _save(base.convert("LA"), "PNG")),
        ("img-gif-animated", "animated GIF (first frame used)", "succeeded", gif.getvalue()),
        ("img-webp", "WebP", "succeeded", _save(base, "WEBP")),
        ("img-bmp", "BMP", "succeeded", _save(base, "BMP")),
        ("img-tiff", "TIFF", "succeeded", _save(base, "TIFF")),
        ("img-heic", "HEIC (an iPhone's format)", "succeeded", _save(base, "HEIF")),
        ("img-avif", "AVIF", "succeeded", _save(base, "AVIF")),
        ("img-wrong-ext", "PNG bytes named .jpg", "succeeded", png),
        ("img-tga", "TGA (Pillow reads it; not in image_formats)", "image_corrupt", _save(base, "TGA")),
        ("img-ico", "ICO (not in image_formats)", "image_corrupt", _save(base, "ICO")),
        ("img-exif-rotated", "JPEG with EXIF orientation 6", "succeeded", _save(base, "JPEG", exif=exif)),
        (
            "img-1x1",
            "1×1 pixel (resized up to min_pixels)",
            "succeeded",
            _save(Image.new("RGB", (1, 1)), "PNG"),
        ),
        (
            "img-panorama",
            "8,000×20 panorama (aspect clamped)",
            "succeeded",
            _save(Image.new("RGB", (8000, 20)), "PNG"),
        ),
    ]


def cases() -> list[Case]:
    ok_img = f"s3://{BUCKET}/good.jpg"
    good = photo(64, 48, seed=1)
    out = [
        Case(
            "wire-not-msgpack",
            "bytes that are neither msgpack nor JSON",
            "bad_message",
            b"\xc1\xc1\xc1",
            stateless=True,
        ),
        Case("wire-empty", "an empty value", "bad_message", b"", stateless=True),
        Case(
            "wire-bad-json",
            "broken JSON",
            "bad_message",
            b'{"job_id": "x", "messages": [',
            content_type=b"application/json",
            stateless=True,
        ),
        Case(
            "wire-content-type",
            "unknown content-type header",
            "bad_message",
            _job("x", "hi"),
            content_type=b"application/xml",
        ),
        Case("wire-version", "schema version 99", "unsupported_version", _job("x", "hi", v=99)),
        Case("wire-v0", "schema version 0", "invalid_job", _job("x", "hi", v=0)),
        Case(
            "wire-no-id",
            "job_id missing",
            "invalid_job",
            json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(),
            stateless=True,
        ),
        Case(
            "wire-id-type",
            "job_id is a number",
            "invalid_job",
            json.dumps({"job_id": 7, "messages": []}).encode(),
            stateless=True,
        ),
        Case("wire-id-chars", "job_id with spaces", "invalid_job", _job("has space", "hi"), stateless=True),
        Case(
            "wire-id-long", "job_id of 200 characters", "invalid_job", _job("x" * 200, "hi"), stateless=True
        ),
        Case("wire-no-messages", "messages missing", "invalid_job", json.dumps({"job_id": "x"}).encode()),
        Case(
            "wire-empty-messages",
            "messages empty",
            "invalid_job",
            json.dumps({"job_id": "x", "messages": []}).encode(),
        ),
        Case(
            "wire-role",
            "unknown role",
            "invalid_job",
            json.dumps({"job_id": "x", "messages": [{"role": "robot", "content": "x"}]}).encode(),
        ),
        Case("wire-empty-content", "content an empty list", "invalid_job", _job("x", [])),
        Case(
            "wire-part-type",
            "unknown content part type",
            "invalid_job",
            _job("x", [{"type": "audio", "uri": "s3://a/b"}]),
        ),
        Case("wire-max-tokens", "max_tokens -1", "invalid_job", _job("x", "hi", sampling={"max_tokens": -1})),
        Case(
            "wire-max-tokens-type",
            "max_tokens a string",
            "invalid_job",
            _job("x", "hi", sampling={"max_tokens": "9"}),
        ),
        Case(
            "wire-max-tokens-huge",
            "max_tokens 1,000,000",
            "invalid_job",
            _job("x", "hi", sampling={"max_tokens": 1_000_000}),
        ),
        Case(
            "wire-temperature", "temperature 5", "invalid_job", _job("x", "hi", sampling={"temperature": 5})
        ),
        Case("wire-top-p", "top_p 0", "invalid_job", _job("x", "hi", sampling={"top_p": 0})),
        Case("wire-ftp", "image URI scheme ftp://", "invalid_job", _img_job("x", "ftp://host/a.jpg")),
        Case("wire-no-scheme", "image URI without a scheme", "invalid_job", _img_job("x", "photos/a.jpg")),
        Case("wire-10mb-prompt", "a 10 MB prompt", "invalid_job", _job("x", "x" * 10_000_000)),
        Case("wire-1000-images", "1,000 images in one job", "invalid_job", _img_job("x", *[ok_img] * 1000)),
        Case(
            "wire-regex",
            "response_format regex that does not compile",
            "invalid_job",
            _job("x", "hi", response_format={"type": "regex", "pattern": "("}),
        ),
        Case(
            "wire-choice",
            "response_format choice with no choices",
            "invalid_job",
            _job("x", "hi", response_format={"type": "choice", "choices": []}),
        ),
        Case(
            "wire-format-type",
            "unknown response_format type",
            "invalid_job",
            _job("x", "hi", response_format={"type": "grammar"}),
        ),
        Case(
            "wire-metadata", "metadata value not a string", "invalid_job", _job("x", "hi", metadata={"a": 1})
        ),
        Case("wire-priority", "priority out of range", "invalid_job", _job("x", "hi", priority=10**9)),
        Case(
            "wire-deep-nesting",
            "a JSON schema nested 5,000 levels (a RecursionError in any decoder)",
            "bad_message",
            b'{"job_id": "x", "messages": [{"role": "user", "content": "hi"}], "response_format": '
            b'{"type": "json_schema", "schema": ' + b'{"p": ' * 5000 + b"{}" + b"}" * 5000 + b"}}",
            stateless=True,
        ),
        Case(
            "wire-schema-depth",
            "a JSON schema 40 objects deep (80 levels, over 64)",
            "invalid_job",
            _job("x", "hi", response_format={"type": "json_schema", "schema": _nested(40)}),
        ),
        Case(
            "wire-schema-size",
            "a JSON schema of 100 KB (over 64 KiB)",
            "invalid_job",
            _job(
                "x", "hi", response_format={"type": "json_schema", "schema": {"description": "d" * 100_000}}
            ),
        ),
        Case(
            "wire-nan-deadline",
            "deadline NaN (msgpack; it would never pass)",
            "invalid_job",
            msgpack={"messages": [{"role": "user", "content": "hi"}], "deadline": float("nan")},
        ),
        Case(
            "wire-seed-huge",
            "seed 2**70 (over int64)",
            "invalid_job",
            _job("x", "hi", sampling={"seed": 2**70}),
        ),
        Case(
            "wire-metadata-many",
            "metadata with 100 entries (over 64)",
            "invalid_job",
            _job("x", "hi", metadata={f"k{i}": "v" for i in range(100)}),
        ),
        Case(
            "wire-stop-long",
            "a stop string of 5,000 characters",
            "invalid_job",
            _job("x", "hi", sampling={"stop": ["s" * 5000]}),
        ),
        Case(
            "wire-id-not-key",
            "invalid, and its job_id is not its Kafka key (whose job? nobody's)",
            "invalid_job",
            _job("someone-else", "hi", sampling={"max_tokens": 0}),
            stateless=True,
        ),
        Case(
            "job-result-topic-dlq",
            "result_topic names the dead-letter topic",
            "invalid_job",
            _job("x", "hi", result_topic="{dlq}"),
        ),
        Case(
            "job-pixel-hint",
            "image asks for max_pixels 100,000,000 (clamped to the worker's)",
            "succeeded",
            _job(
                "x", [{"type": "image", "uri": ok_img, "min_pixels": 90_000_000, "max_pixels": 100_000_000}]
            ),
            objects={"good.jpg": good},
        ),
        Case(
            "wire-result-topic",
            "result_topic with invalid characters",
            "invalid_job",
            _job("x", "hi", result_topic="no spaces!"),
        ),
        Case(
            "job-too-many-images",
            "5 images, the worker allows 4",
            "too_many_images",
            _img_job("x", *[ok_img] * 5),
            objects={"good.jpg": good},
        ),
        Case("job-long-prompt", "prompt over max_prompt_chars", "prompt_too_long", _job("x", "y" * 150_000)),
        Case(
            "job-model-len",
            "prompt + max_tokens over the engine's max_model_len",
            "prompt_too_long",
            _job("x", "z" * 9000),
        ),
        Case(
            "job-unknown-model",
            "a model this worker does not serve",
            "unknown_model",
            _job("x", "hi", model="llama-9000"),
        ),
        Case("job-engine-error", "the engine raises", "engine_error", _job("x", "please EXPLODE")),
        Case("job-deadline", "deadline already passed", "expired", _job("x", "hi", deadline=1.0)),
        Case("uri-missing", "missing S3 object", "image_not_found", _img_job("x", f"s3://{BUCKET}/nope.jpg")),
        Case(
            "uri-denied-bucket",
            "bucket outside allowed_buckets",
            "uri_not_allowed",
            _img_job("x", "s3://someone-else/a.jpg"),
        ),
        Case(
            "uri-file",
            "file:// outside allowed_file_roots",
            "uri_not_allowed",
            _img_job("x", "file:///etc/passwd"),
        ),
        Case(
            "uri-https",
            "https:// to the cloud metadata address (SSRF)",
            "uri_not_allowed",
            _img_job("x", "https://169.254.169.254/latest/meta-data"),
        ),
        Case(
            "uri-http", "http:// (off by default)", "uri_not_allowed", _img_job("x", "http://localhost:6379/")
        ),
        Case(
            "uri-data-b64",
            "data: URI with invalid base64",
            "image_corrupt",
            _img_job("x", "data:image/png;base64,@@@@"),
        ),
        Case(
            "uri-data-plain",
            "data: URI not base64",
            "image_corrupt",
            _img_job("x", "data:image/png,rawbytes"),
        ),
        Case(
            "uri-data-big",
            "data: URI over max_image_bytes",
            "image_too_large",
            _img_job("x", "data:image/jpeg;base64," + base64.b64encode(b"\0" * 400_000).decode()),
        ),
        Case(
            "uri-job-bytes",
            "4 images of 250 KB each: every one under max_image_bytes, together over max_job_bytes (800 KB)",
            "image_too_large",
            _img_job("x", *(f"s3://{BUCKET}/quarter-{i}.jpg" for i in range(4))),
            objects={f"quarter-{i}.jpg": good + b"\0" * (250_000 - len(good)) for i in range(4)},
        ),
        Case(
            "uri-sha256",
            "sha256 given and wrong",
            "image_checksum",
            _job("x", [{"type": "image", "uri": ok_img, "sha256": "0" * 64}]),
            objects={"good.jpg": good},
        ),
        Case(
            "uri-sha256-ok",
            "sha256 given and right",
            "succeeded",
            _job("x", [{"type": "image", "uri": ok_img, "sha256": hashlib.sha256(good).hexdigest()}]),
            objects={"good.jpg": good},
        ),
    ]
    for name, what, expect, body in image_cases():
        out.append(
            Case(
                name, what, expect, _img_job("x", f"s3://{BUCKET}/{name}.jpg"), objects={f"{name}.jpg": body}
            )
        )
    return out


def markdown() -> str:
    rows = ["| case | input | outcome |", "|---|---|---|"]
    rows += [f"| `{c.name}` | {c.what} | {outcome(c)} |" for c in cases()]
    return "\n".join(rows)


def outcome(case: Case) -> str:
    return f"`{case.expect}`, dead letter only" if case.stateless else f"`{case.expect}`"


if __name__ == "__main__":
    print(markdown())
