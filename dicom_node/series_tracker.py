"""Series completion: when a received series (one revision of it) counts as complete.

A series is complete ``completion.quiet_seconds`` after its last instance (default 10 s), or
at once when its expected instance count is known and reached (:func:`expected_count`). The
decision is a durable ``series_events`` row written in the same SQLite transaction that marks
the series complete, so each revision completes exactly once, and after a crash (kill -9) the
tracker simply resumes: quiet timers are computed from ``series.last_received_at`` in the
index, not from memory. A new instance of a complete series starts revision ``n + 1`` (which
holds the whole series); the listener logs it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from pydicom.uid import EnhancedMRColorImageStorage, EnhancedMRImageStorage

from dicom_node.config import CompletionConfig
from dicom_node.index import CompletionEvent, SeriesIndex
from dicom_node.logs import get_logger
from dicom_node.spool import InstanceHeader

log = get_logger("series_tracker")

ENHANCED_MR_CLASSES = frozenset({str(EnhancedMRImageStorage), str(EnhancedMRColorImageStorage)})
"""SOP classes whose single multi-frame instance usually is the whole series."""

MAX_TRUSTED_COUNT = 100_000
"""Expected counts above this are treated as unknown (a corrupt header must not stall)."""


def expected_count(header: InstanceHeader) -> int | None:
    """The number of instances the series is expected to have, when the header says so.

    Conservative on purpose; ``None`` (wait for the quiet period) unless:

    - the instance is an Enhanced MR multi-frame instance (``NumberOfFrames`` > 1): the
      series is that one instance;
    - ``NumberOfTemporalPositions`` (0020,0105) and ``NumberOfSlices`` (0054,0081) are both
      present and positive: the series has their product.

    The index ignores the count when instances of one series disagree on it. If a series turns
    out to have more instances, they start the next revision (nothing is lost).
    """
    if header.sop_class_uid in ENHANCED_MR_CLASSES and header.number_of_frames > 1:
        return 1
    t, s = header.number_of_temporal_positions, header.number_of_slices
    if t and s and t > 0 and s > 0 and t * s <= MAX_TRUSTED_COUNT:
        return t * s
    return None


def log_completion(ev: CompletionEvent) -> None:
    """The one log line per completed revision."""
    log.info("series_complete", series_uid=ev.series_instance_uid, revision=ev.revision,
             reason=ev.reason, instances=ev.instance_count, event_id=ev.event_id)


class SeriesTracker:
    """Background thread that completes quiet series.

    Args:
        index: The series index.
        config: ``completion`` settings (quiet period, poll interval).
    """

    def __init__(self, index: SeriesIndex, config: CompletionConfig) -> None:
        self.index = index
        self.config = config
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[CompletionEvent], None]] = []

    def add_listener(self, fn: Callable[[CompletionEvent], None]) -> None:
        """Call ``fn(event)`` after each completion (e.g. to wake the router)."""
        self._listeners.append(fn)

    def completed(self, events: list[CompletionEvent]) -> None:
        """Log and announce completions made elsewhere (the listener's expected-count path)."""
        for ev in events:
            log_completion(ev)
            for fn in self._listeners:
                try:
                    fn(ev)
                except Exception:  # noqa: BLE001 - a listener must not stop the tracker
                    log.exception("completion_listener_failed", event_id=ev.event_id)

    def notify(self) -> None:
        """An instance arrived: re-plan the next wake-up."""
        self._wake.set()

    def start(self) -> None:
        """Start the thread; series left receiving by a previous run resume their timers."""
        pending = self.index.receiving_series()
        if pending:
            now = time.time()
            log.info("series_resumed", count=len(pending),
                     oldest_quiet_s=round(now - pending[0][2], 3),
                     quiet_seconds=self.config.quiet_seconds)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="series-tracker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (pending timers stay in the index)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def run_once(self, now: float | None = None) -> list[CompletionEvent]:
        """Complete every series that is quiet now; returns the new events."""
        events = self.index.complete_quiet(self.config.quiet_seconds, now)
        self.completed(events)
        return events

    def _run(self) -> None:
        poll = self.config.poll_interval_s
        while not self._stop.is_set():
            try:
                self.run_once()
                deadline = self.index.next_quiet_deadline(self.config.quiet_seconds)
            except Exception:  # noqa: BLE001 - keep tracking; the index may be busy
                log.exception("series_tracker_error")
                deadline = None
            wait = poll if deadline is None else min(poll, max(deadline - time.time(), 0.01))
            self._wake.wait(wait)
            self._wake.clear()
