"""The deployment files in deploy/: they parse, have the pieces deploy/README.md promises, and every `hpo`
command line in them uses subcommands and flags that exist (so renaming a flag fails here, not on a cluster).
Fast, no network. `docker compose config` (or Debian's `docker-compose`, which `.ci/run` installs) validates the
Compose file; without either the test skips on a user's machine and fails on CI."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from search.cli import build_parser
from tests.services import missing

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
SBATCH = DEPLOY / "slurm" / "hpo-workers.sbatch"
DOCKERFILE = DEPLOY / "Dockerfile.worker"
YAML_FILES = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))


def load(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def k8s_objects() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in load(path)]


def one(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in deploy/k8s, found {len(found)}"
    return found[0]


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return obj["spec"]["template"]["spec"]["containers"]


# --- hpo command lines ----------------------------------------------------------------------------------

def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def check_hpo(argv: list[str], where: str) -> None:
    """``argv`` starts with 'hpo'. The subcommand must exist, every --flag must be one of its option strings
    exactly (argparse would accept an abbreviation or silently take a renamed flag's prefix), and the whole
    line must parse."""
    assert argv[0] == "hpo", where
    argv = [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", token) for token in argv]  # ${VAR:-default}: its default
    commands = subparsers()
    assert len(argv) > 1 and argv[1] in commands, f"{where}: unknown hpo subcommand in {argv}"
    sub = commands[argv[1]]
    options = {s for action in sub._actions for s in action.option_strings}
    for token in argv[2:]:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            assert flag in options, f"{where}: `hpo {argv[1]}` has no option {flag} (it has {sorted(options)})"
    if "--help" in argv or "-h" in argv:
        return
    try:
        build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        raise AssertionError(f"{where}: `{shlex.join(argv)}` does not parse with search.cli.build_parser()") from exc


def yaml_invocations() -> list[tuple[str, list[str]]]:
    """(where, argv) for every container whose command/entrypoint starts with hpo: k8s command + args,
    Compose entrypoint + command."""
    found: list[tuple[str, list[str]]] = []
    for path in sorted(K8S.glob("*.yaml")):
        for obj in load(path):
            if obj["kind"] in {"Job", "Deployment"}:
                for c in containers(obj):
                    argv = [str(x) for x in c.get("command", []) + c.get("args", [])]
                    if argv[:1] == ["hpo"]:
                        found.append((f"{path.name}:{obj['metadata']['name']}", argv))
    for name, service in load(COMPOSE)[0]["services"].items():
        entry, command = service.get("entrypoint", []), service.get("command", [])
        assert not isinstance(entry, str) and not isinstance(command, str), f"compose {name}: use lists"
        argv = [str(x) for x in entry + command]
        if argv[:1] == ["hpo"]:
            found.append((f"compose.yaml:{name}", argv))
    return found


def shell_invocations(text: str) -> list[list[str]]:
    """Every `hpo ...` in the non-comment shell lines of a script (backslash continuations joined), up to
    the end of that command (;, &&, ||, |)."""
    joined = re.sub(r"\\\n", " ", text)
    found = []
    for line in joined.splitlines():
        if line.lstrip().startswith("#") or not re.search(r"(^|\s)hpo\s", line):
            continue
        tokens = shlex.split(line, comments=True)
        for i, token in enumerate(tokens):
            if token == "hpo":
                rest = []
                for t in tokens[i + 1:]:
                    if t in {";", "&&", "||", "|"}:
                        break
                    rest.append(t)
                found.append(["hpo", *rest])
    return found


def dockerfile_invocations() -> list[list[str]]:
    """`hpo ...` in RUN lines, and ENTRYPOINT followed by CMD (what `docker run IMAGE` with no arguments runs)."""
    found, entrypoint, cmd = [], [], []
    for line in re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"\s*(ENTRYPOINT|RUN|CMD)\s+(.*)", line)
        if not m:
            continue
        body = m.group(2).strip()
        argv = json.loads(body) if body.startswith("[") else shlex.split(body)
        if m.group(1) == "ENTRYPOINT":
            entrypoint = argv
        elif m.group(1) == "CMD":
            cmd = argv
        elif argv[:1] == ["hpo"]:
            found.append(argv)
    if entrypoint[:1] == ["hpo"]:
        found.append(entrypoint + cmd)
    return found


def all_invocations() -> list[tuple[str, list[str]]]:
    return (yaml_invocations()
            + [(SBATCH.name, argv) for argv in shell_invocations(SBATCH.read_text(encoding="utf-8"))]
            + [(DOCKERFILE.name, argv) for argv in dockerfile_invocations()])


def test_every_hpo_command_line_uses_existing_subcommands_and_flags() -> None:
    invocations = all_invocations()
    where = [w for w, _ in invocations]
    # not vacuous: each file's hpo lines were found
    assert {"create-study-job.yaml:hpo-create-study", "worker-job.yaml:hpo-workers", "compose.yaml:create-study",
            "compose.yaml:worker-gpu0", SBATCH.name, DOCKERFILE.name} <= set(where), where
    for place, argv in invocations:
        check_hpo(argv, place)


@pytest.mark.parametrize("argv", [
    ["hpo", "worker", "s.toml", "--tracking-url", "http://m:5000"],  # a renamed flag
    ["hpo", "worker", "s.toml", "--run", "/runs"],                    # an abbreviation argparse would take
    ["hpo", "wrker", "s.toml"],                                       # a misspelt subcommand
    ["hpo", "worker", "s.toml", "--trials"],                          # a flag without its value
])
def test_the_check_refuses_flags_and_commands_that_do_not_exist(argv: list[str]) -> None:
    with pytest.raises(AssertionError):
        check_hpo(argv, "example")


def test_workers_get_the_shared_storage_and_tracking_server() -> None:
    for place, argv in all_invocations():
        if argv[1] != "worker" or "--help" in argv or len(argv) == 2:
            continue
        args = build_parser().parse_args([re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", t) for t in argv[1:]])
        assert args.storage and args.tracking_uri, f"{place}: a worker needs --storage and --tracking-uri"
        assert args.storage.startswith(("postgresql", "$")), place
        assert args.tracking_uri.startswith(("http://", "$")), place


# --- parsing and structure ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    assert load(path), f"{path} has no document"


def test_k8s_objects_have_the_expected_kinds() -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in k8s_objects())
    assert kinds == sorted([("Secret", "hpo-db"), ("PersistentVolumeClaim", "mlflow-artifacts"),
                            ("Deployment", "mlflow"), ("Service", "mlflow"), ("Job", "hpo-create-study"),
                            ("Job", "hpo-workers")])
    for obj in k8s_objects():
        assert obj["apiVersion"] in {"v1", "apps/v1", "batch/v1"}


def test_k8s_worker_job() -> None:
    job = one("Job", "hpo-workers")
    assert isinstance(job["spec"]["parallelism"], int) and job["spec"]["parallelism"] >= 2
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in {"OnFailure", "Never"}
    assert pod["terminationGracePeriodSeconds"] > 60
    (worker,) = containers(job)
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize("kind,name,var,key", [
    ("Job", "hpo-workers", "HPO_STORAGE", "storage-url"),
    ("Job", "hpo-create-study", "HPO_STORAGE", "storage-url"),
    ("Deployment", "mlflow", "MLFLOW_BACKEND_URI", "mlflow-backend-uri"),
])
def test_k8s_database_urls_come_from_the_secret(kind: str, name: str, var: str, key: str) -> None:
    secret = one("Secret", "hpo-db")
    (container,) = containers(one(kind, name))
    env = {e["name"]: e for e in container["env"]}
    ref = env[var]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret["metadata"]["name"], "key": key}
    assert key in secret["stringData"] and "CHANGE-ME" in secret["stringData"][key]  # a placeholder only
    assert f"$({var})" in container["args"]  # and it is what the command uses
    for value in container["args"]:
        assert "postgresql" not in str(value), f"{name}: a database URL written into the manifest"


def test_k8s_mlflow_server_and_service() -> None:
    deployment, service = one("Deployment", "mlflow"), one("Service", "mlflow")
    (server,) = containers(deployment)
    assert server["command"] == ["mlflow", "server"]
    args = server["args"]
    assert "--serve-artifacts" in args and args[args.index("--artifacts-destination") + 1] == "/mlartifacts"
    assert any(m["mountPath"] == "/mlartifacts" for m in server["volumeMounts"])
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["port"] == 5000
    for job in ("hpo-workers", "hpo-create-study"):
        env = {e["name"]: e.get("value") for e in containers(one("Job", job))[0]["env"]}
        assert env["MLFLOW_URI"] == "http://mlflow:5000"


def test_compose_services_and_gpu_reservations() -> None:
    compose = load(COMPOSE)[0]
    services = compose["services"]
    assert {"postgres", "mlflow", "create-study"} <= services.keys()
    workers = [name for name in services if name.startswith("worker")]
    assert workers, "no worker service"
    assert "pgdata" in compose["volumes"] and "mlartifacts" in compose["volumes"]
    assert any(v.startswith("pgdata:") for v in services["postgres"]["volumes"])
    mlflow = services["mlflow"]
    assert mlflow["entrypoint"] == ["mlflow", "server"]
    assert "--serve-artifacts" in mlflow["command"]
    assert "mlartifacts:/mlartifacts" in mlflow["volumes"]
    assert services["create-study"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    for name in workers:
        service = services[name]
        assert service["entrypoint"] == ["hpo", "worker"]
        assert "replicas" in service["deploy"]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert device.get("count") == 1 or len(device.get("device_ids", [])) == 1, f"{name}: one GPU per worker"
        assert service["depends_on"]["create-study"]["condition"] == "service_completed_successfully"
    gpus = [services[n]["deploy"]["resources"]["reservations"]["devices"][0].get("device_ids") for n in workers]
    pinned = [ids[0] for ids in gpus if ids]
    assert len(pinned) == len(set(pinned)), "two worker services pinned to the same GPU"


def test_slurm_script_runs_one_worker_per_gpu() -> None:
    text = SBATCH.read_text(encoding="utf-8")
    assert text.startswith("#!/bin/bash\n")
    directives = dict(re.findall(r"^#SBATCH\s+(--[\w-]+)=(\S+)", text, flags=re.M))
    assert int(directives["--ntasks"]) >= 1 and directives["--gpus-per-task"] == "1"
    srun = re.sub(r"\\\n", " ", text)
    assert re.search(r"^srun .*--ntasks=\"\$SLURM_NTASKS\".*--gpus-per-task=1 .*hpo worker", srun, flags=re.M)
    assert subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True).returncode == 0


def test_dockerfile_worker() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.\d+-slim", text, flags=re.M)
    assert re.search(r"^RUN pip install torch torchvision$", text, flags=re.M)
    assert re.search(r"^RUN pip install \. 'psycopg\[binary\]", text, flags=re.M)
    user = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert user and user[-1] not in {"root", "0"}
    assert dockerfile_invocations() == [["hpo", "worker", "--help"]]
    for path in re.findall(r"^COPY (\S+) ", text, flags=re.M):  # what it copies exists
        assert (DEPLOY.parent / path).exists(), path


def _compose_command() -> list[str] | None:
    """`docker compose` (the plugin) where it works, else Debian's standalone `docker-compose`."""
    docker = shutil.which("docker")
    if docker is not None:
        try:
            if subprocess.run([docker, "compose", "version"], capture_output=True, timeout=20).returncode == 0:
                return [docker, "compose"]
        except (OSError, subprocess.TimeoutExpired):
            pass
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


def test_docker_compose_config_validates() -> None:
    compose = _compose_command()
    if compose is None:
        pytest.skip(missing("neither `docker compose` nor `docker-compose` is installed (`apt-get install "
                            "docker-compose`), so the Compose file is checked only by the structure tests above"))
    result = subprocess.run([*compose, "-f", str(COMPOSE), "config", "-q"], capture_output=True,
                            text=True, timeout=60, cwd=DEPLOY)
    assert result.returncode == 0, result.stderr
