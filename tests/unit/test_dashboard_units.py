"""The dashboard's pure pieces: thumbnails (a decompression bomb is refused from its
header), the throughput chart, and the rates the list shows."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from vlmq.api.dashboard.data import Sample, _rate, _status, _summary
from vlmq.api.dashboard.thumbs import _thumb
from vlmq.api.dashboard.views import _chart
from vlmq.core.state import BatchCounts
from vlmq.worker.samples import photo


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "HEIF", "AVIF"])
def test_a_thumbnail_is_a_small_jpeg(fmt: str) -> None:
    out = Image.open(io.BytesIO(_thumb(photo(1200, 900, fmt=fmt))))
    assert out.format == "JPEG" and max(out.size) <= 160


def test_a_bomb_is_refused_before_it_is_decoded() -> None:
    huge = Image.new("1", (9_000, 9_000))  # 81 M pixels in a few KB of PNG
    buf = io.BytesIO()
    huge.save(buf, "PNG")
    with pytest.raises(ValueError, match="over"):
        _thumb(buf.getvalue())


def test_rate_eta_status_and_chart_from_samples() -> None:
    samples = [Sample(100.0, 0, 0), Sample(130.0, 30, 3), Sample(160.0, 90, 3)]
    assert _rate(samples) == pytest.approx(1.5)  # 90 jobs over the last 60 s
    s = _summary(BatchCounts(total=120, succeeded=87, failed=3), samples, cancelled=False)
    assert s.rate == pytest.approx(1.5) and s.ended_at is None
    assert _status(BatchCounts(total=120, succeeded=87, failed=3), False) == "running"
    assert _status(BatchCounts(total=4, succeeded=2, cancelled=2), True) == "cancelled"
    assert _status(BatchCounts(total=4, queued=4), False) == "queued"
    chart = _chart(samples, width=100, height=50)
    assert chart["peak"] == pytest.approx(2.0) and chart["span"] == pytest.approx(30.0)
    assert chart["ok"].split()[-1] == "100.0,10.0"  # the peak at the top (10 px margin)
