"""Timing work that runs on the device, without making the host wait for it at every step."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


class DeviceClock:
    """Seconds spent in the sections timed with ``with clock.timed(): ...``, added up.

    On a GPU the host runs ahead of the device, so the host's clock at the end of a section says
    when its work was queued, not when it ran. There each section is bracketed by CUDA events,
    recorded in the stream without a sync; ``seconds`` waits for the last of them once, when it
    is read (do that where the program syncs anyway, e.g. at the end of an epoch). Elsewhere the
    host's clock is the device's.
    """

    def __init__(self, device: torch.device, seconds: float = 0.0) -> None:
        self._events = device.type == "cuda"
        self._done = seconds
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._last = 0.0  # the most recent section alone

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Count the block's device time."""
        if self._events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((start, end))
            return
        started = time.perf_counter()
        yield
        self._last = time.perf_counter() - started
        self._done += self._last

    @property
    def seconds(self) -> float:
        """Every timed section so far, in seconds (on a GPU: waits for the sections to finish)."""
        self._settle()
        return self._done

    @property
    def last_section(self) -> float:
        """The most recent timed section alone, in seconds (on a GPU: waits for it)."""
        self._settle()
        return self._last

    def _settle(self) -> None:
        for start, end in self._pending:
            end.synchronize()
            self._last = start.elapsed_time(end) / 1000
            self._done += self._last
        self._pending.clear()
