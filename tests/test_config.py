from pathlib import Path

import pytest
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_is_valid() -> None:
    s = load_config(ROOT / "config.yaml")
    assert s.node.port == 11112
    assert s.destinations["pacs"].kind == "dimse"
    assert s.storage.path.is_absolute() and s.storage.path == ROOT / "var" / "spool"


def test_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMNIMRI__NODE__PORT", "11113")
    monkeypatch.setenv("OMNIMRI__DESTINATIONS__PACS__PORT", "4243")
    s = load_config(ROOT / "config.yaml")
    assert s.node.port == 11113
    assert s.destinations["pacs"].port == 4243  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("node:\n  port: 70000\n", "node.port", "less than or equal to 65535"),
        ("node:\n  ae_title: 'A\\\\B'\n", "node.ae_title", "AE title"),
        ("storage:\n  bogus: 1\n", "storage.bogus", "Extra inputs"),
        ("node: [1, 2]\n", "node", "valid dictionary"),
        (
            "node:\n  allowed_callers:\n    - {host: 300.1.1.1}\n",
            "node.allowed_callers.0.host",
            "IP",
        ),
        (
            "pipelines: {}\nrules:\n  - {name: a, pipelines: [nope]}\n",
            "rules.0.pipelines",
            "unknown pipeline",
        ),
        ("node: {port: 1\n", "<file>", "not valid YAML: line"),
    ],
)
def test_invalid_config_names_key_and_reason(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    p = tmp_path / "config.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    keys = [k for k, _ in err.value.problems]
    assert key in keys, err.value
    assert reason in str(err.value)


def test_check_config_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["check-config", "--config", str(ROOT / "config.yaml")])
    assert ok.exit_code == 0, ok.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("node:\n  port: nope\n")
    res = runner.invoke(app, ["check-config", "--config", str(bad)])
    assert res.exit_code == 2
    assert "node.port" in res.output
