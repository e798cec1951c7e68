"""Reload ``config.yaml`` without a restart: on SIGHUP and whenever the file changes.

A changed file is loaded and validated with :func:`dicom_node.config.load_config` (environment
overrides included) and its rules are parsed into a :class:`~dicom_node.rules.RuleSet`. Only a
file that passes both is handed to the ``on_change`` callback; an invalid one is *refused*: each
key path and reason is logged once (``config_reload_refused``) and the running configuration
and rules stay as they were.

Usage::

    reloader = ConfigReloader(path, on_change=node.apply_settings, initial=settings)
    reloader.start()   # SIGHUP handler (main thread only) + file watch (watchfiles)
    ...
    reloader.stop()

The file's folder is watched non-recursively, so editors that save by writing a new file and
renaming it over the old one are seen too. Reloads run on one background thread, one at a time;
the signal handler only wakes that thread.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import watchfiles

from dicom_node.config import ConfigError, NodeSettings, load_config
from dicom_node.logs import get_logger
from dicom_node.rules.engine import RuleSet
from dicom_node.rules.parser import ConditionSyntaxError

log = get_logger(__name__)

DEFAULT_DEBOUNCE_MS = 300
"""File events closer together than this are one change, milliseconds."""


class ConfigReloader:
    """Watches the configuration file and hands each valid new version to ``on_change``."""

    def __init__(
        self,
        path: Path | str,
        on_change: Callable[[NodeSettings], None],
        *,
        initial: NodeSettings | None = None,
        watch_file: bool = True,
        handle_sighup: bool = True,
        debounce_ms: int = DEFAULT_DEBOUNCE_MS,
    ) -> None:
        """Set up (nothing runs until :meth:`start`).

        Args:
            path: The ``config.yaml`` the node runs with.
            on_change: Called with the new settings after a valid, different file is loaded
                (on the reloader's thread, or the caller's for :meth:`reload`).
            initial: The settings the node runs with now; default: load ``path`` now.
            watch_file: Reload when the file changes (watchfiles). Default on.
            handle_sighup: Reload on SIGHUP (only possible from the main thread). Default on.
            debounce_ms: Group file events this close together, milliseconds.

        Raises:
            ConfigError: When ``initial`` is not given and ``path`` is invalid.
        """
        self.path = Path(path)
        self.on_change = on_change
        self._current = initial if initial is not None else load_config(self.path)
        self._watch_file = watch_file
        self._handle_sighup = handle_sighup
        self._debounce_ms = debounce_ms
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._old_handler: Any = None
        self._sighup_installed = False
        self.reloads = 0
        """Valid configurations applied since start."""
        self.refusals = 0
        """Invalid configurations refused since start."""

    @property
    def current(self) -> NodeSettings:
        """The configuration in force (the last valid one)."""
        return self._current

    def reload(self) -> bool:
        """Load the file now; apply it if valid and different.

        Returns:
            ``True`` when a new configuration was applied, ``False`` when the file was refused
            or unchanged (the current configuration stays).
        """
        with self._lock:
            try:
                new = load_config(self.path)
                RuleSet(new.rules)  # every condition parses (the config validator checks too)
            except ConfigError as err:
                self.refusals += 1
                log.warning(
                    "config_reload_refused",
                    path=str(self.path),
                    problems=[f"{k}: {why}" for k, why in err.problems],
                    keeping="previous configuration",
                )
                return False
            except ConditionSyntaxError as err:  # pragma: no cover - validator catches it first
                self.refusals += 1
                log.warning("config_reload_refused", path=str(self.path), problems=[str(err)])
                return False
            if new.model_dump(mode="json") == self._current.model_dump(mode="json"):
                log.info("config_reload_unchanged", path=str(self.path))
                return False
            try:
                self.on_change(new)
            except Exception as err:
                self.refusals += 1
                log.error(
                    "config_apply_failed",
                    path=str(self.path),
                    error=f"{type(err).__name__}: {err}",
                    keeping="previous configuration",
                )
                return False
            self._current = new
            self.reloads += 1
            log.info("config_reloaded", path=str(self.path), rules=len(new.rules))
            return True

    def request_reload(self) -> None:
        """Ask the background thread to reload (safe from a signal handler)."""
        self._wake.set()

    def _on_sighup(self, signum: int, frame: FrameType | None) -> None:
        self.request_reload()

    def start(self) -> None:
        """Start the reload thread, the file watch and (from the main thread) the SIGHUP handler."""
        if self._threads:
            return
        self._stop.clear()
        worker = threading.Thread(target=self._run, name="config-reload", daemon=True)
        worker.start()
        self._threads.append(worker)
        if self._watch_file:
            watcher = threading.Thread(target=self._watch, name="config-watch", daemon=True)
            watcher.start()
            self._threads.append(watcher)
        if self._handle_sighup and hasattr(signal, "SIGHUP"):
            try:
                self._old_handler = signal.signal(signal.SIGHUP, self._on_sighup)
                self._sighup_installed = True
            except ValueError:
                log.warning("config_sighup_unavailable", reason="not the main thread")
        log.info(
            "config_watch_started",
            path=str(self.path),
            file_watch=self._watch_file,
            sighup=self._sighup_installed,
        )

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop watching, restore the previous SIGHUP handler and join the threads (seconds)."""
        self._stop.set()
        self._wake.set()
        if self._sighup_installed:
            with contextlib.suppress(ValueError):  # stop() from another thread: leave it
                signal.signal(signal.SIGHUP, self._old_handler or signal.SIG_DFL)
            self._sighup_installed = False
        for t in self._threads:
            t.join(timeout_s)
        self._threads.clear()

    def __enter__(self) -> ConfigReloader:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                self.reload()
            except Exception as err:  # never let the reload thread die
                log.error("config_reload_error", error=f"{type(err).__name__}: {err}")

    def _watch(self) -> None:
        target = self.path.resolve()
        folder = target.parent

        def only_the_file(change: watchfiles.Change, path: str) -> bool:
            return Path(path).name == target.name

        try:
            for _changes in watchfiles.watch(
                folder,
                watch_filter=only_the_file,
                debounce=self._debounce_ms,
                stop_event=self._stop,
                recursive=False,
                rust_timeout=1000,
                yield_on_timeout=False,
                raise_interrupt=False,
            ):
                if self._stop.is_set():
                    return
                self._wake.set()
        except Exception as err:  # a watch that fails leaves SIGHUP working
            log.error("config_watch_failed", path=str(folder), error=f"{type(err).__name__}: {err}")
