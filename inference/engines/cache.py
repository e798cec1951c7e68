"""The one engine cache: a warm engine per model package and engine settings, closed when stale.

An engine holds a session and, on a GPU, device memory; loading one takes seconds (minutes when
TensorRT builds a plan). The cache keeps one ready engine per *slot* — package folder, engine
preference, Triton URL, CPU threads — and remembers the package's *fingerprint*: the
``(size, mtime_ns, inode)`` of ``model.yaml`` and of every file directly in its version folders
(the graphs, decoder, vocabulary; not the engines' own cache folders, nor TensorRT plans, which
an engine builds itself). When the fingerprint changes (``model.yaml`` edited, a graph
replaced) the next request loads the package again and the old engine is closed, so an edit
never leaves an engine — and its GPU memory — behind.

Jobs use :meth:`EngineCache.lease`: an engine replaced while a job runs on it is closed when
that job gives it back, never under it. :meth:`EngineCache.retain` closes the engines a new
configuration no longer uses (config reload); :meth:`EngineCache.close` closes all of them
(node shutdown).

:func:`default_cache` is the process's cache (the node's pipelines and
:func:`inference.engines.shared_engine` share it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from inference.engines import Engine
    from inference.package import ModelPackage

__all__ = ["EngineCache", "EngineSlot", "Fingerprint", "Loaded", "default_cache",
           "package_fingerprint"]

_log = structlog.get_logger(__name__)

Fingerprint = tuple[tuple[str, int, int, int], ...]
"""``(relative path, size in bytes, mtime in ns, inode)`` of each file that defines a package."""

_SKIPPED_SUFFIXES = (".plan",)
"""Files an engine writes into the version folder itself (TensorRT plans): not the package."""


def package_fingerprint(folder: Path | str) -> Fingerprint:
    """What identifies a package's content on disk, cheaply (one ``stat`` per file).

    Parameters
    ----------
    folder
        The package folder (``model.yaml`` and numeric version folders).

    Returns
    -------
    Fingerprint
        Sorted entries for ``model.yaml`` and every regular file directly inside each numeric
        version folder (except TensorRT ``.plan`` files); empty for a missing folder.
    """
    root = Path(folder)
    files = [root / "model.yaml"]
    if root.is_dir():
        for sub in root.iterdir():
            if sub.is_dir() and sub.name.isdigit():
                files += [p for p in sub.iterdir()
                          if p.is_file() and not p.name.endswith(_SKIPPED_SUFFIXES)]
    out = []
    for p in files:
        try:
            st = p.stat()
        except OSError:
            continue
        out.append((p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(sorted(out))


@dataclass(frozen=True)
class EngineSlot:
    """What one cached engine is for: a package folder run with one engine configuration.

    Build it with :meth:`of`, which resolves the folder and normalises the preference.
    """

    folder: str
    """The package folder, resolved."""
    preference: tuple[str, ...]
    """Engines to try in order; empty = :data:`inference.engines.DEFAULT_ORDER` (``auto``)."""
    triton_url: str | None = None
    """Triton server for ``triton``."""
    intra_op_threads: int = 0
    """CPU threads per inference (0 = all cores)."""

    @classmethod
    def of(cls, folder: Path | str, preference: str | Sequence[str] = "auto",
           triton_url: str | None = None, intra_op_threads: int = 0) -> EngineSlot:
        """The slot of ``folder`` with ``preference`` (``"auto"``, one name or a list)."""
        if isinstance(preference, str):
            order: tuple[str, ...] = () if preference == "auto" else (preference,)
        else:
            order = tuple(preference)
        return cls(str(Path(folder).resolve()), order, triton_url, intra_op_threads)


@dataclass(frozen=True)
class Loaded:
    """A package and its ready engine, as the cache hands them out."""

    package: ModelPackage
    engine: Engine
    fresh: bool
    """``True`` for the request that loaded it (the caller may warm up what depends on it)."""


@dataclass(eq=False)
class _Entry:
    slot: EngineSlot
    stamp: Fingerprint
    package: ModelPackage
    engine: Engine
    users: int = 0
    retired: bool = False
    closed: bool = False


class EngineCache:
    """Warm engines by slot; a stale, evicted or retired engine is closed exactly once.

    Thread-safe: worker threads share one instance. Loading holds the cache's lock (two jobs
    asking for the same new package load it once).
    """

    def __init__(self) -> None:
        self._entries: dict[EngineSlot, _Entry] = {}
        self._lock = threading.RLock()
        self.loads = 0
        """Engines created since start."""
        self.closes = 0
        """Engines closed since start (stale, evicted or at shutdown)."""

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def slots(self) -> list[EngineSlot]:
        """The slots that hold an engine now."""
        with self._lock:
            return list(self._entries)

    def get(self, slot: EngineSlot, *, warm_up: bool = False,
            package: ModelPackage | None = None) -> Loaded:
        """The ready engine of ``slot`` (loaded now if missing or if the package changed).

        The engine stays open until the package changes or the cache evicts or closes it; a
        job that must not see it closed under it uses :meth:`lease`.

        Parameters
        ----------
        slot
            The package folder and engine configuration (:meth:`EngineSlot.of`).
        warm_up
            Run one zero batch through a newly loaded engine (:func:`inference.runner.warm_up`).
        package
            The already loaded package of ``slot.folder`` (used when the cache loads); default:
            read its ``model.yaml``.

        Raises
        ------
        inference.package.PackageError
            The package is invalid.
        inference.engines.EngineUnavailable
            No engine in the slot's preference runs here.
        """
        entry, fresh = self._acquire(slot, warm_up, package, lease=False)
        return Loaded(entry.package, entry.engine, fresh)

    @contextmanager
    def lease(self, slot: EngineSlot, *, warm_up: bool = False) -> Iterator[Loaded]:
        """Like :meth:`get`, and the engine is not closed before the ``with`` block ends."""
        entry, fresh = self._acquire(slot, warm_up, None, lease=True)
        try:
            yield Loaded(entry.package, entry.engine, fresh)
        finally:
            with self._lock:
                entry.users -= 1
                close_now = entry.retired and entry.users == 0
            if close_now:
                self._close(entry, "replaced while in use")

    def retain(self, keep: Collection[EngineSlot] | Callable[[EngineSlot], bool]) -> int:
        """Close the engines whose slot is not in ``keep`` (after a configuration change).

        Returns
        -------
        int
            How many engines were evicted (an engine in use closes when its lease ends).
        """
        wanted = keep if callable(keep) else (lambda s: s in keep)
        with self._lock:
            gone = [e for s, e in self._entries.items() if not wanted(s)]
            for e in gone:
                del self._entries[e.slot]
        for e in gone:
            self._retire(e, "no longer configured")
        return len(gone)

    def close(self) -> int:
        """Close every engine (node shutdown); returns how many were evicted."""
        return self.retain(())

    # -- internals -------------------------------------------------------------------------

    def _acquire(self, slot: EngineSlot, warm_up: bool, package: ModelPackage | None, *,
                 lease: bool) -> tuple[_Entry, bool]:
        stamp = package_fingerprint(slot.folder)
        with self._lock:
            entry = self._entries.get(slot)
            if entry is not None and entry.stamp == stamp:
                entry.users += lease
                return entry, False
            if entry is not None:
                del self._entries[slot]
                self._retire(entry, "package changed")
            entry = self._load(slot, stamp, warm_up, package)
            self._entries[slot] = entry
            entry.users += lease
            return entry, True

    def _load(self, slot: EngineSlot, stamp: Fingerprint, warm_up: bool,
              package: ModelPackage | None) -> _Entry:
        from inference.engines import select_engine
        from inference.package import ModelPackage

        pkg = package if package is not None else ModelPackage.load(slot.folder)
        engine = select_engine(pkg, slot.preference, slot.triton_url,
                               intra_op_threads=slot.intra_op_threads)
        self.loads += 1
        if warm_up:
            from inference.runner import warm_up as _warm

            try:
                seconds = _warm(pkg, engine)
            except BaseException:
                engine.close()
                self.closes += 1
                raise
            _log.info("engine warmed up", model=pkg.name, engine=engine.name,
                      seconds=round(seconds, 3))
        return _Entry(slot=slot, stamp=stamp, package=pkg, engine=engine)

    def _retire(self, entry: _Entry, reason: str) -> None:
        with self._lock:
            entry.retired = True
            in_use = entry.users > 0
        if in_use:
            _log.info("engine retired", model=entry.package.name, engine=entry.engine.name,
                      reason=reason, users=entry.users)
            return
        self._close(entry, reason)

    def _close(self, entry: _Entry, reason: str) -> None:
        with self._lock:
            if entry.closed:
                return
            entry.closed = True
        try:
            entry.engine.close()
        except Exception as err:  # a failing close must not stop the others
            _log.error("engine close failed", model=entry.package.name,
                       engine=entry.engine.name, error=f"{type(err).__name__}: {err}")
        with self._lock:
            self.closes += 1
        _log.info("engine closed", model=entry.package.name, engine=entry.engine.name,
                  reason=reason)


_DEFAULT = EngineCache()


def default_cache() -> EngineCache:
    """The process's engine cache (the node closes it on reload and at shutdown)."""
    return _DEFAULT
