"""Mean GPU utilization (NVML) over a window, for the GPU benchmarks."""

from __future__ import annotations

import statistics
import threading
from typing import Any


class GpuSampler:
    """Mean utilization of every GPU every 0.2 s while open (`mean`: GPU 0; `per_gpu`: each);
    None where there is no GPU. NVML counts the time any kernel runs, not how full the GPU
    is: judge by images/s."""

    def __init__(self) -> None:
        self.samples: list[list[int]] = []
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._nvml: Any = pynvml
        except Exception:
            self._nvml = None

    def __enter__(self) -> GpuSampler:
        if self._nvml:
            threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.samples.append([self._nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._handles])

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    @property
    def per_gpu(self) -> list[float] | None:
        if not self.samples:
            return None
        return [round(statistics.fmean(col), 1) for col in zip(*self.samples, strict=True)]

    @property
    def mean(self) -> float | None:
        return self.per_gpu[0] if self.per_gpu else None
