"""Config reload: a bad file is refused (old rules keep running); SIGHUP and file changes reload."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from dicom_node.config import NodeSettings, load_config
from dicom_node.reload import ConfigReloader
from dicom_node.rules import RuleSet, SeriesAttributes

BASE = """\
storage:
  path: var/spool
pipelines:
  brain: {{kind: preview, model: null}}
  knee: {{kind: preview, model: null}}
rules:
  - name: {name}
    when: '{when}'
    pipelines: [{pipeline}]
"""


def _write(path: Path, name: str, when: str, pipeline: str = "brain") -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(BASE.format(name=name, when=when, pipeline=pipeline), encoding="utf-8")
    os.replace(tmp, path)  # atomic, like editors and config managers do


class Recorder:
    def __init__(self) -> None:
        self.applied: list[NodeSettings] = []
        self.event = threading.Event()

    def __call__(self, settings: NodeSettings) -> None:
        self.applied.append(settings)
        self.event.set()


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    p = tmp_path / "config.yaml"
    _write(p, "brain", 'CalledAE == "OMNI_BRAIN"')
    return p


KNEE = SeriesAttributes.from_mapping({"Modality": "MR", "CalledAE": "OMNI_KNEE"})


def test_bad_file_is_refused_and_old_rules_stay(cfg: Path) -> None:
    rec = Recorder()
    reloader = ConfigReloader(cfg, rec)
    before = reloader.current
    _write(cfg, "knee", 'CalledAE == "OMNI_KNEE" and SliceThicknes < 2', "knee")
    with capture_logs() as logs:
        assert reloader.reload() is False
    assert reloader.current is before and rec.applied == [] and reloader.refusals == 1
    refused = [e for e in logs if e["event"] == "config_reload_refused"]
    assert len(refused) == 1
    assert any(
        p.startswith("rules.0.when: column 29: unknown attribute") for p in refused[0]["problems"]
    )
    assert RuleSet(reloader.current.rules).evaluate(KNEE).fired == []

    # an unknown pipeline is refused with its key path too
    _write(cfg, "knee", 'CalledAE == "OMNI_KNEE"', "nope")
    with capture_logs() as logs:
        assert reloader.reload() is False
    assert "rules.0.pipelines: unknown pipeline 'nope'" in logs[0]["problems"]

    _write(cfg, "knee", 'CalledAE == "OMNI_KNEE"', "knee")
    assert reloader.reload() is True
    assert [r.name for r in rec.applied[0].rules] == ["knee"]
    assert reloader.current is rec.applied[0]
    assert [r.name for r in RuleSet(reloader.current.rules).evaluate(KNEE).fired] == ["knee"]
    # unchanged file: nothing to apply
    assert reloader.reload() is False and len(rec.applied) == 1


def test_missing_file_is_refused(cfg: Path) -> None:
    reloader = ConfigReloader(cfg, Recorder())
    cfg.unlink()
    with capture_logs() as logs:
        assert reloader.reload() is False
    assert logs[0]["problems"] == ["<file>: no such file"]


def test_failing_callback_keeps_old_config(cfg: Path) -> None:
    def boom(settings: NodeSettings) -> None:
        raise RuntimeError("cannot apply")

    reloader = ConfigReloader(cfg, boom)
    before = reloader.current
    _write(cfg, "knee", 'CalledAE == "OMNI_KNEE"', "knee")
    with capture_logs() as logs:
        assert reloader.reload() is False
    assert reloader.current is before
    assert logs[0]["event"] == "config_apply_failed"


def test_sighup_reloads(cfg: Path) -> None:
    rec = Recorder()
    reloader = ConfigReloader(cfg, rec, initial=load_config(cfg), watch_file=False)
    reloader.start()
    try:
        _write(cfg, "knee", 'CalledAE == "OMNI_KNEE"', "knee")
        os.kill(os.getpid(), signal.SIGHUP)
        assert rec.event.wait(5.0), "SIGHUP did not reload"
        assert [r.name for r in rec.applied[-1].rules] == ["knee"]
    finally:
        reloader.stop()
    assert signal.getsignal(signal.SIGHUP) is not reloader._on_sighup  # handler restored


def test_file_change_reloads_and_bad_edit_is_refused(cfg: Path) -> None:
    rec = Recorder()
    reloader = ConfigReloader(cfg, rec, handle_sighup=False, debounce_ms=100)
    with reloader:
        # the watcher needs a moment to arm; poll by rewriting until it reacts (max ~5 s)
        for attempt in range(10):
            _write(cfg, "knee", f'CalledAE == "OMNI_KNEE" and InstanceCount > {attempt}', "knee")
            if rec.event.wait(0.5):
                break
        assert rec.applied, "file change was not picked up"
        assert rec.applied[-1].rules[0].name == "knee"
        applied = len(rec.applied)
        refusals = reloader.refusals
        _write(cfg, "broken", 'Modality == "MR" and (', "knee")
        for _ in range(50):
            if reloader.refusals > refusals:
                break
            threading.Event().wait(0.1)
        assert reloader.refusals > refusals
        assert len(rec.applied) == applied
        assert reloader.current.rules[0].name == "knee"
