"""What the CLI's job flags mean, checked before anything is sent: `--labels` and `-p`."""

from __future__ import annotations

from pathlib import Path

from vlmq.producer.errors import ValidationError
from vlmq.schemas.job import MAX_TEXT_CHARS

# A prompt file is read whole: bounded like a job's text part, so a wrong file (a video, a
# log) is refused at once rather than read into memory and sent.
MAX_PROMPT_FILE_BYTES = MAX_TEXT_CHARS


def labels(text: str | None) -> list[str] | None:
    """`--labels safe,nsfw` as a list; None when not given. An empty value or an empty label
    is refused: it used to become a caption job without a word."""
    if text is None:
        return None
    found = [label.strip() for label in text.split(",")]
    if not any(found):
        raise ValidationError("--labels is empty: give the answers to choose from, e.g. --labels safe,nsfw")
    if not all(found):
        raise ValidationError(f"--labels {text!r} has an empty label: e.g. --labels safe,nsfw")
    return found


def prompt(text: str) -> str:
    """`-p "text"`, or `-p @FILE` for the prompt in a file (UTF-8, at most
    MAX_PROMPT_FILE_BYTES); `@@...` is a prompt that starts with a literal `@`."""
    if text.startswith("@@"):
        return text[1:]
    if not text.startswith("@"):
        return text
    path = Path(text[1:])
    if not text[1:]:
        raise ValidationError(
            "-p @ needs a file name: -p @prompt.txt (or -p @@... for a prompt starting with @)"
        )
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ValidationError(f"prompt file {str(path)!r} {what}: -p @FILE reads the prompt from FILE")
    with path.open("rb") as f:
        data = f.read(MAX_PROMPT_FILE_BYTES + 1)
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise ValidationError(f"prompt file {str(path)!r} is over {MAX_PROMPT_FILE_BYTES:,} bytes")
    try:
        read = data.decode().strip()
    except UnicodeDecodeError:
        raise ValidationError(f"prompt file {str(path)!r} is not UTF-8 text") from None
    if not read:
        raise ValidationError(f"prompt file {str(path)!r} is empty")
    return read
