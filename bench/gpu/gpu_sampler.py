"""Mean GPU utilization (NVML) over a window, for the GPU benchmarks."""

from __future__ import annotations

import statistics
import threading
from typing import Any


class GpuSampler:
    """Mean utilization of GPU `index` every 0.2 s while open; None where there is no GPU.
    NVML counts the time any kernel runs, not how full the GPU is: judge by images/s."""

    def __init__(self, index: int = 0) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._h = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml: Any = pynvml
        except Exception:
            self._nvml = None

    def __enter__(self) -> GpuSampler:
        if self._nvml:
            threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._h).gpu)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return round(statistics.fmean(self.samples), 1) if self.samples else None
