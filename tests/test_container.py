"""The container artefacts agree with each other and with the code, without Docker.

No container engine can run a container in CI: .ci/check-container builds the
image with podman and runs the product inside its root filesystem. These tests
read the Dockerfile, the Compose file and the Kubernetes manifests as data and
check what that script cannot: the entrypoint, user, volume, ports, paths and
probes line up across the three, the shipped TOML files load through
`load_settings`, and the image's healthcheck command really passes against a
live /healthz (and fails against an unhealthy one).

PyYAML is not a dependency, so `read_yaml` below reads the small YAML subset
these files use (block maps and lists, `|` scalars, JSON-style flow lists,
quoted and plain scalars). The real YAML tooling validates the same files in
.ci/check-container.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from orchestrator.cli import build_parser
from orchestrator.config import Settings, load_settings
from orchestrator.models import ObjectType
from orchestrator.simulator import Simulator
from tests.support.data import result_path
from tests.support.processes import CliRunner, clean_env
from tests.support.settings import LEADS, fast_settings

ROOT = Path(__file__).resolve().parent.parent
UID = "10001"
PORT = 9400

# --- a tiny reader for the YAML subset our files use -----------------------------

MAP_ITEM = re.compile(r"^[A-Za-z0-9_.\-/]+:(\s|$)")


def read_yaml(path: Path) -> list[Any]:
    """Every document of a YAML file."""
    docs: list[list[str]] = []
    current: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() == "---":
            docs.append(current)
            current = []
        else:
            current.append(line)
    docs.append(current)
    return [_Block(lines).parse() for lines in docs if any(_strip(x).strip() for x in lines)]


def _strip(line: str) -> str:
    """The line without a trailing comment (a # outside quotes, after a space)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _scalar(text: str) -> Any:
    text = text.strip()
    if text.startswith(("[", '"')):
        return json.loads(text)
    if text.startswith("'"):
        return text[1:-1].replace("''", "'")
    if text in ("true", "false"):
        return text == "true"
    if text in ("null", "~", ""):
        return None
    return int(text) if re.fullmatch(r"-?(0|[1-9][0-9]*)", text) else text


class _Block:
    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.i = 0

    def parse(self) -> Any:
        head = self._peek()
        return None if head is None else self._node(head[0])

    def _peek(self) -> tuple[int, str] | None:
        while self.i < len(self.lines):
            text = _strip(self.lines[self.i])
            if text.strip():
                return len(text) - len(text.lstrip()), text.strip()
            self.i += 1
        return None

    def _node(self, indent: int) -> Any:
        head = self._peek()
        assert head is not None
        return self._seq(indent) if head[1].startswith("-") else self._map(indent)

    def _map(self, indent: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while (head := self._peek()) and head[0] == indent and not head[1].startswith("- "):
            key, _, rest = head[1].partition(":")
            self.i += 1
            rest = rest.strip()
            if rest in ("|", "|-"):
                out[key] = self._literal(indent, keep_newline=rest == "|")
            elif rest:
                out[key] = _scalar(rest)
            else:
                nxt = self._peek()
                nested = nxt is not None and (
                    nxt[0] > indent or (nxt[0] == indent and nxt[1].startswith("-"))
                )
                out[key] = self._node(nxt[0]) if nxt and nested else None
        return out

    def _seq(self, indent: int) -> list[Any]:
        out: list[Any] = []
        while (head := self._peek()) and head[0] == indent and head[1].startswith("-"):
            item = head[1][1:].strip()
            if MAP_ITEM.match(item):
                # "- key: value": the rest of the item is a map two columns in.
                self.lines[self.i] = " " * (indent + 2) + item
                out.append(self._map(indent + 2))
            else:
                self.i += 1
                out.append(_scalar(item))
        return out

    def _literal(self, indent: int, *, keep_newline: bool) -> str:
        body: list[str] = []
        while self.i < len(self.lines):
            line = self.lines[self.i]
            if line.strip() and len(line) - len(line.lstrip()) <= indent:
                break
            body.append(line)
            self.i += 1
        while body and not body[-1].strip():
            body.pop()
        cut = min(len(x) - len(x.lstrip()) for x in body if x.strip())
        text = "\n".join(x[cut:] for x in body)
        return text + "\n" if keep_newline else text


# --- the Dockerfile as data -------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuations joined, comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, args = (pending + line).partition(" ")
        pending = ""
        found.append((instruction.upper(), args.strip()))
    return found


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, FROM first; global ARGs before it left out."""
    stages: list[list[tuple[str, str]]] = []
    for name, args in dockerfile_instructions():
        if name == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((name, args))
    return stages


def runtime(instruction: str) -> list[str]:
    """The arguments of every `instruction` in the final stage."""
    return [args for name, args in dockerfile_stages()[-1] if name == instruction]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in runtime("ENV"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def image_settings() -> Settings:
    """What the image's environment alone configures (its secret file exists only inside)."""
    env = {k: v for k, v in image_env().items() if k != "MARKETO_CLIENT_SECRET_FILE"}
    return load_settings(None, env, require_credentials=False)


def healthcheck_command() -> list[str]:
    [args] = runtime("HEALTHCHECK")
    _, _, command = args.partition(" CMD ")
    return list(json.loads(command))


# --- the other files --------------------------------------------------------------


def compose() -> dict[str, Any]:
    [doc] = read_yaml(ROOT / "docker-compose.yml")
    return dict(doc)


def interpolate(value: str, env: dict[str, str]) -> str:
    """A Compose value with `${VAR:-default}` and `${VAR}` replaced as Compose does."""

    def one(match: re.Match[str]) -> str:
        return env.get(match[1]) or (match[2] or "")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}", one, value)


def service_env(service: dict[str, Any], **variables: str) -> dict[str, str]:
    """A Compose service's environment, interpolated with `variables` (the shell's)."""
    return {k: interpolate(str(v), variables) for k, v in service["environment"].items()}


# The Secret the sidecars mount the Marketo client secret from (secret.yaml).
CREDENTIALS = "marketo-orchestrator-credentials"


def kubernetes_objects() -> list[dict[str, Any]]:
    """Every object of every manifest in config/kubernetes/, file by file."""
    found = []
    for path in sorted((ROOT / "config" / "kubernetes").glob("*.yaml")):
        found += [dict(doc, file=path.name) for doc in read_yaml(path)]
    return found


def manifests() -> dict[str, dict[str, Any]]:
    """Kubernetes objects by kind; "Secret" is the Marketo credentials (others: `secret`)."""
    found: dict[str, dict[str, Any]] = {}
    for doc in kubernetes_objects():
        if doc["kind"] != "Secret" or doc["metadata"]["name"] == CREDENTIALS:
            assert doc["kind"] not in found, f"two objects of kind {doc['kind']}"
            found[doc["kind"]] = doc
    return found


def secret(name: str) -> dict[str, Any]:
    [found] = [
        d for d in kubernetes_objects() if d["kind"] == "Secret" and d["metadata"]["name"] == name
    ]
    return found


def plain_env(container: dict[str, Any]) -> dict[str, str]:
    """A container's environment variables given as values (not from a Secret)."""
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def pod_spec() -> dict[str, Any]:
    return dict(manifests()["Deployment"]["spec"]["template"]["spec"])


def sidecar() -> dict[str, Any]:
    [container] = [c for c in pod_spec()["containers"] if "marketo-orchestrator" in c["image"]]
    return dict(container)


def mount_path(container: dict[str, Any], volume: str) -> str:
    [path] = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume]
    return str(path)


def volume(name: str) -> dict[str, Any]:
    [found] = [v for v in pod_spec()["volumes"] if v["name"] == name]
    return dict(found)


def url_in(code: str) -> tuple[str, int | None, str]:
    """(host, port, path) of the URL a healthcheck's Python code opens."""
    [url] = re.findall(r"f?'(http://[^']+)'", code)
    parts = urlsplit(url.replace("{port}", "0"))
    port = None if "{port}" in url else parts.port
    return parts.hostname or "", port, parts.path


def load_with_secret_file(toml: Path, env: dict[str, str], secret: str, tmp_path: Path) -> Settings:
    """The settings the container would load, its secret file replaced by a local one."""
    secret_file = tmp_path / "client_secret"
    secret_file.write_text(secret + "\n", encoding="utf-8")
    local = {**env, "MARKETO_CLIENT_SECRET_FILE": str(secret_file)}
    return load_settings(toml, local, require_credentials=True)


# --- Dockerfile -------------------------------------------------------------------


def test_image_is_built_from_a_wheel_in_a_separate_stage() -> None:
    build, run = dockerfile_stages()[0], dockerfile_stages()[-1]
    assert len(dockerfile_stages()) == 2
    assert any("pip wheel" in a and "--no-deps" in a for n, a in build if n == "RUN")
    assert any(n == "COPY" and a.startswith("--from=build") for n, a in run)
    [install] = [a for n, a in run if n == "RUN" and "pip install" in a]
    assert ".whl" in install
    # Dependencies at the pinned versions, from the committed constraints file.
    [(_, constraints)] = re.findall(r"--(constraint|c) (\S+)", install) or [("", "")]
    assert ("COPY", f"--from=build /src/constraints.txt {constraints}") in run
    assert [a for n, a in build if n == "FROM"] == ["${PYTHON_IMAGE} AS build"]
    assert [a for n, a in run if n == "FROM"] == ["${PYTHON_IMAGE} AS runtime"]
    [base] = [a for n, a in dockerfile_instructions() if n == "ARG" and "PYTHON_IMAGE" in a]
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.1[1-9]\.\d+-slim(-\w+)?", base)


def test_entrypoint_runs_the_daemon_as_pid_1() -> None:
    [entrypoint] = runtime("ENTRYPOINT")
    assert json.loads(entrypoint) == ["marketo-orchestrator"]
    [cmd] = runtime("CMD")
    assert json.loads(cmd) == ["run"]
    assert runtime("STOPSIGNAL") == ["SIGTERM"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "marketo-orchestrator" in scripts


def test_container_arguments_are_the_subcommand() -> None:
    """`docker run IMAGE` runs the daemon; `docker run IMAGE status` runs status, not `run status`."""
    from orchestrator.cli import build_parser

    [cmd] = runtime("CMD")
    assert build_parser().parse_args(json.loads(cmd)).command == "run"
    assert build_parser().parse_args(["status"]).command == "status"
    assert build_parser().parse_args(["run", "--once"]).once is True


def test_image_labels_come_from_build_arguments() -> None:
    labels: dict[str, str] = {}
    for args in runtime("LABEL"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            labels[key] = value
    declared = {}
    for args in runtime("ARG"):
        name, _, default = args.partition("=")
        declared[name] = default
    oci = "org.opencontainers.image."
    for key, arg in (
        ("version", "VERSION"),
        ("revision", "REVISION"),
        ("created", "CREATED"),
        ("source", "SOURCE"),
    ):
        assert labels[oci + key] == "${" + arg + "}", key
        assert arg in declared, f"ARG {arg} must be declared in the runtime stage"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert declared["VERSION"] == version


# --- constraints.txt ----------------------------------------------------------------

CHECK_CONSTRAINTS = ROOT / ".ci" / "check_constraints.py"


def check_constraints(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHECK_CONSTRAINTS), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_constraints_pin_every_declared_dependency() -> None:
    proc = check_constraints()
    assert proc.returncode == 0, proc.stderr
    assert dockerignore_allows("constraints.txt")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "--constraint constraints.txt" in ci
    assert ".ci/check_constraints.py --installed" in ci


def test_constraints_check_catches_a_missing_or_stale_pin(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\ndependencies = ["aiohttp>=3.9", "newdep>=1"]\n', encoding="utf-8"
    )
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("aiohttp==3.8.0\n", encoding="utf-8")
    proc = check_constraints("--pyproject", str(pyproject), "--constraints", str(constraints))
    assert proc.returncode == 1
    assert "newdep>=1 (pyproject.toml) is not pinned" in proc.stderr
    assert "aiohttp==3.8.0, outside aiohttp>=3.9" in proc.stderr


def test_constraints_check_covers_the_postgres_extra_only(tmp_path: Path) -> None:
    """The image installs the postgres extra, so its dependencies are pinned; dev tools are not."""
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\ndependencies = ["aiohttp>=3.9"]\n'
        "[project.optional-dependencies]\n"
        'postgres = ["psycopg>=3.2"]\n'
        'dev = ["x[postgres]", "pytest>=8"]\n',
        encoding="utf-8",
    )
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("aiohttp==3.9.0\n", encoding="utf-8")
    proc = check_constraints("--pyproject", str(pyproject), "--constraints", str(constraints))
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "check_constraints: psycopg>=3.2 (pyproject.toml) is not pinned in constraints.txt"
    ]
    constraints.write_text("aiohttp==3.9.0\npsycopg==3.3.9\n", encoding="utf-8")
    proc = check_constraints("--pyproject", str(pyproject), "--constraints", str(constraints))
    assert proc.returncode == 0, proc.stderr


def requirement_names(texts: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", text, maxsplit=1)[0] for text in texts}


def test_postgres_driver_is_an_optional_extra_the_image_installs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert "psycopg" not in requirement_names(project["dependencies"])  # the default install
    assert "psycopg" in requirement_names(project["optional-dependencies"]["postgres"])
    assert "postgres" in CHECK_CONSTRAINTS.read_text(encoding="utf-8")  # EXTRAS, pinned too
    assert re.search(r"(?m)^psycopg==", (ROOT / "constraints.txt").read_text(encoding="utf-8"))
    # The image: the wheel with the extra, at the pinned versions, and the libpq it loads.
    [install] = [a for a in runtime("RUN") if "pip install" in a]
    assert '"${wheel}[postgres]"' in install
    assert "--constraint /tmp/wheels/constraints.txt" in install
    [apt] = [a for a in runtime("RUN") if "apt-get install" in a]
    assert "libpq5" in apt.split()
    assert "import psycopg" in (ROOT / ".ci" / "check-container").read_text(encoding="utf-8")


# Any `import psycopg` in this interpreter raises ImportError, as without the extra.
WITHOUT_PSYCOPG = (
    "import sys; sys.modules['psycopg'] = None; "
    "from orchestrator.cli import main; sys.exit(main(sys.argv[1:]))"
)


async def test_the_daemon_runs_without_the_postgres_driver(
    tmp_path: Path, simulator: Simulator
) -> None:
    """The default install has no psycopg: without a coordination URL nothing imports it."""
    settings = fast_settings(simulator.base_url, tmp_path / "data", (LEADS,))
    runner = CliRunner.for_settings(tmp_path / "daemon", settings)
    inbox = settings.data_dir / "inbox" / "leads"
    inbox.mkdir(parents=True)
    (inbox / "few.csv").write_text("email,firstName\nada@example.com,Ada\n", encoding="utf-8")
    assert runner.config is not None
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WITHOUT_PSYCOPG,
        "run",
        "--once",
        "--config",
        str(runner.config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(**runner.env),
        cwd=runner.workdir,
    )
    async with asyncio.timeout(60):
        _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    done = json.loads(result_path(settings.data_dir, "done", "leads", "few.csv").read_text())
    assert (done["status"], done["rows_processed"]) == ("complete", 1)


def test_image_runs_as_a_fixed_non_root_uid() -> None:
    [user] = runtime("USER")
    assert user.split(":")[0] == UID
    [useradd] = [a for a in runtime("RUN") if "useradd" in a]
    assert f"--uid {UID}" in useradd
    assert any(f"chown {UID}:{UID} /data" in a for a in runtime("RUN"))


def test_data_volume_is_the_data_dir() -> None:
    assert [json.loads(v) for v in runtime("VOLUME")] == [["/data"]]
    env = image_env()
    assert env["ORCHESTRATOR_DATA_DIR"] == "/data"
    assert image_settings().data_dir == Path("/data")


def test_image_environment_listens_on_the_exposed_port() -> None:
    env = image_env()
    assert image_settings().http.host_port == ("0.0.0.0", PORT)
    assert runtime("EXPOSE") == [str(PORT)]
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HOME"].startswith("/tmp")
    assert env["ORCHESTRATOR_CONFIG"] == "/etc/marketo-orchestrator/orchestrator.toml"
    assert env["MARKETO_CLIENT_SECRET_FILE"] == "/run/secrets/marketo_client_secret"


def test_healthcheck_asks_healthz_without_curl() -> None:
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"]
    host, port, path = url_in(command[2])
    assert (host, port, path) == ("127.0.0.1", None, "/healthz")
    assert "ORCHESTRATOR_HTTP_LISTEN" in command[2]
    compile(command[2], "<healthcheck>", "exec")


@pytest.fixture
async def health_server() -> AsyncIterator[Callable[[int], str]]:
    """A real /healthz on 127.0.0.1; the returned setter picks its status code."""
    status = {"code": 200}

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(status=status["code"], text="ok")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]

    def answer(code: int) -> str:
        status["code"] = code
        return f"127.0.0.1:{port}"

    yield answer
    await runner.cleanup()


async def run_python_code(code: str, env: dict[str, str]) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(proc.wait(), timeout=30)


async def test_healthcheck_passes_on_200_and_fails_otherwise(
    health_server: Callable[[int], str],
) -> None:
    code = healthcheck_command()[2]
    listen = health_server(200)
    assert await run_python_code(code, {"ORCHESTRATOR_HTTP_LISTEN": listen}) == 0
    listen = health_server(503)
    assert await run_python_code(code, {"ORCHESTRATOR_HTTP_LISTEN": listen}) != 0


def dockerignore_allows(path: str) -> bool:
    """Docker's rule, near enough: the last pattern matching the path or a parent wins."""
    allowed = True
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        options = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(p, o) for p in prefixes for o in options):
            allowed = negate
    return allowed


def test_build_context_holds_the_package_and_nothing_else() -> None:
    assert ("COPY", ". .") in dockerfile_stages()[0]
    for needed in ("pyproject.toml", "README.md", "constraints.txt", "orchestrator/cli/main.py"):
        assert dockerignore_allows(needed), needed
    for kept_out in (
        ".git/HEAD",
        "tests/test_container.py",
        "tests/data/big.csv",
        ".venv/bin/python",
        "venv/bin/python",
        "orchestrator-data/state.db",
        "bench/.cache/sample.csv",
        "config/demo-client-secret.txt",
        "orchestrator/__pycache__/cli.cpython-311.pyc",
        ".mypy_cache/3.11/x.json",
        "marketo_orchestrator.egg-info/PKG-INFO",
    ):
        assert not dockerignore_allows(kept_out), kept_out


# --- docker-compose.yml -----------------------------------------------------------


def test_compose_runs_daemon_and_simulator_from_one_image() -> None:
    services = compose()["services"]
    sim, orch = services["simulator"], services["orchestrator"]
    assert sim["image"] == orch["image"]
    assert sim["build"] == orch["build"] == "."
    # The image's entrypoint is the program; a service's command is the subcommand.
    assert sim["command"] == ["simulator", "--host", "0.0.0.0", "--port", "8090"]
    assert "entrypoint" not in sim
    assert "entrypoint" not in orch
    assert "command" not in orch  # the image's CMD: run
    assert orch["depends_on"] == {"simulator": {"condition": "service_healthy"}}
    for service in (sim, orch, services["pipeline"]):
        assert service["read_only"] is True
        assert "/tmp" in service["tmpfs"]


def test_compose_mounts_config_secret_and_data_where_the_image_looks() -> None:
    doc, env = compose(), image_env()
    orch = doc["services"]["orchestrator"]
    mounts = dict(v.split(":")[1::-1] for v in orch["volumes"])
    assert mounts[env["ORCHESTRATOR_CONFIG"]] == "./config/compose.toml"
    assert mounts[env["ORCHESTRATOR_DATA_DIR"]] in doc["volumes"]
    assert orch["secrets"] == ["marketo_client_secret"]
    assert env["MARKETO_CLIENT_SECRET_FILE"] == "/run/secrets/marketo_client_secret"
    # The image's environment, and the coordination URL (empty unless the shell sets it).
    assert service_env(orch).items() <= {**env, "ORCHESTRATOR_COORDINATION_URL": ""}.items()
    secret_file = ROOT / doc["secrets"]["marketo_client_secret"]["file"]
    assert "demo" in secret_file.read_text(encoding="utf-8")
    assert "DEMO VALUE" in (ROOT / "docker-compose.yml").read_text(encoding="utf-8")


def test_compose_config_loads_and_points_at_the_simulator(tmp_path: Path) -> None:
    doc = compose()
    orch = doc["services"]["orchestrator"]
    secret = (ROOT / "config" / "demo-client-secret.txt").read_text(encoding="utf-8").strip()
    env = {**image_env(), **service_env(orch)}
    settings = load_with_secret_file(ROOT / "config" / "compose.toml", env, secret, tmp_path)
    assert settings.coordination.url == ""  # alone, unless COORDINATION_URL is set
    assert settings.marketo.client_secret.reveal() == secret
    assert settings.data_dir == Path("/data")
    sim_args = doc["services"]["simulator"]["command"]
    sim_port = int(sim_args[sim_args.index("--port") + 1])
    base = urlsplit(settings.marketo.base_url)
    assert (base.hostname, base.port) == ("simulator", sim_port)
    assert {r.object for r in settings.routes} == set(ObjectType)
    by_object = {r.object: r for r in settings.routes}
    assert by_object[ObjectType.CUSTOM_OBJECT].api_name == "car_c"
    members = by_object[ObjectType.PROGRAM_MEMBERS]
    assert (members.program_id, members.program_member_status) == (1001, "Registered")
    assert settings.http.host_port == ("0.0.0.0", PORT)


def test_compose_healthchecks_and_ports_agree() -> None:
    services = compose()["services"]
    orch, sim = services["orchestrator"], services["simulator"]
    # The image's liveness check, asking /readyz: depends_on waits for readiness.
    readiness = [part.replace("/healthz", "/readyz") for part in healthcheck_command()]
    assert orch["healthcheck"]["test"] == ["CMD", *readiness]
    assert orch["ports"] == [f"127.0.0.1:{PORT}:{PORT}"]
    sim_test = sim["healthcheck"]["test"]
    assert sim_test[:3] == ["CMD", "python", "-c"]
    compile(sim_test[3], "<simulator healthcheck>", "exec")
    assert url_in(sim_test[3]) == ("127.0.0.1", 8090, "/_sim/stats")
    assert sim["ports"] == ["127.0.0.1:8090:8090"]


def test_compose_waits_on_readiness_where_a_service_depends_on_another() -> None:
    services = compose()["services"]
    readiness_paths = {"/readyz", "/_sim/stats"}
    for name, service in services.items():
        for needed, how in service.get("depends_on", {}).items():
            assert how == {"condition": "service_healthy"}, (name, needed)
            if needed == "postgres":  # accepting connections: ready (see the shared profile)
                assert services[needed]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
                continue
            code = services[needed]["healthcheck"]["test"][3]
            assert url_in(code)[2] in readiness_paths, (name, needed)
    pipeline = services["pipeline"]
    assert pipeline["depends_on"] == {"orchestrator": {"condition": "service_healthy"}}
    assert pipeline["image"] == services["orchestrator"]["image"]
    # The hand-over is `submit --wait`, through the image's entrypoint, as the docs show.
    assert "entrypoint" not in pipeline
    args = hand_over_args(pipeline["command"])
    assert documented_command(pipeline["command"]) in " ".join(deployment_doc().split())
    mounts = dict(v.split(":")[1::-1] for v in pipeline["volumes"] if v.count(":") == 1)
    assert mounts["/data"] in compose()["volumes"]
    assert pipeline["environment"]["ORCHESTRATOR_DATA_DIR"] == "/data"
    config = pipeline["environment"]["ORCHESTRATOR_CONFIG"]
    assert f"./config/compose.toml:{config}:ro" in pipeline["volumes"]
    source = next(v for v in pipeline["volumes"] if v.endswith(f":{args.file}:ro"))
    assert (ROOT / source.split(":")[0]).is_file()


async def test_compose_readiness_check_follows_readyz(
    health_server: Callable[[int], str],
) -> None:
    code = compose()["services"]["orchestrator"]["healthcheck"]["test"][3]
    # The fixture serves /healthz only; point the check there to drive its status code.
    code = code.replace("/readyz", "/healthz")
    assert await run_python_code(code, {"ORCHESTRATOR_HTTP_LISTEN": health_server(200)}) == 0
    assert await run_python_code(code, {"ORCHESTRATOR_HTTP_LISTEN": health_server(503)}) != 0


async def test_simulator_healthcheck_passes_against_a_stats_endpoint() -> None:
    async def stats(_: web.Request) -> web.Response:
        return web.json_response({"calls": {}, "jobs": {}})

    app = web.Application()
    app.router.add_get("/_sim/stats", stats)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        code = compose()["services"]["simulator"]["healthcheck"]["test"][3]
        assert code.count(":8090/") == 1
        assert await run_python_code(code.replace(":8090/", f":{port}/"), {}) == 0
    finally:
        await runner.cleanup()


# --- Kubernetes -------------------------------------------------------------------


def test_kubernetes_config_map_loads(tmp_path: Path) -> None:
    toml = tmp_path / "orchestrator.toml"
    toml.write_text(manifests()["ConfigMap"]["data"]["orchestrator.toml"], encoding="utf-8")
    env = {**image_env(), **plain_env(sidecar())}
    secret = manifests()["Secret"]["stringData"]["client_secret"]
    settings = load_with_secret_file(toml, env, secret, tmp_path)
    assert settings.data_dir == Path(mount_path(sidecar(), "data")) == Path("/data")
    assert settings.http.host_port == ("0.0.0.0", PORT)
    assert [r.dir for r in settings.routes] == ["leads"]


def test_kubernetes_mounts_config_and_secret_where_the_env_points() -> None:
    objects, env = manifests(), plain_env(sidecar())
    config = volume("config")["configMap"]
    assert config["name"] == objects["ConfigMap"]["metadata"]["name"]
    [item] = config["items"]
    assert item["key"] in objects["ConfigMap"]["data"]
    config_file = f"{mount_path(sidecar(), 'config')}/{item['path']}"
    assert config_file == env["ORCHESTRATOR_CONFIG"] == image_env()["ORCHESTRATOR_CONFIG"]
    secret = volume("credentials")["secret"]
    assert secret["secretName"] == objects["Secret"]["metadata"]["name"]
    [item] = secret["items"]
    assert item["key"] in objects["Secret"]["stringData"]
    secret_file = f"{mount_path(sidecar(), 'credentials')}/{item['path']}"
    assert env["MARKETO_CLIENT_SECRET_FILE"] == secret_file
    assert all(e["name"] != "MARKETO_CLIENT_SECRET" for e in sidecar()["env"])


def test_kubernetes_probes_hit_the_status_server() -> None:
    container = sidecar()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert list(ports.values()) == [PORT]
    probes = (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"))
    for probe, path in (*probes, ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == PORT
    # Liveness takes over only after the startup probe passed: a slow start (opening a
    # large store) has minutes, not liveness's ~30 s.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    assert "initialDelaySeconds" not in container["livenessProbe"]


def test_kubernetes_deployment_has_one_owner_of_the_volume() -> None:
    deployment = manifests()["Deployment"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    claim = volume("data")["persistentVolumeClaim"]["claimName"]
    pvc = manifests()["PersistentVolumeClaim"]
    assert claim == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_kubernetes_pods_carry_prometheus_scrape_annotations(kind: str) -> None:
    annotations = manifests()[kind]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_kubernetes_pipeline_and_sidecar_share_the_inbox() -> None:
    spec = pod_spec()
    assert "persistentVolumeClaim" in volume("data")
    assert len(spec["containers"]) == 2
    for container in spec["containers"]:
        assert mount_path(container, "data") == "/data"
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= container["resources"][bound].keys()


def test_kubernetes_pod_is_locked_down() -> None:
    spec = pod_spec()
    assert spec["enableServiceLinks"] is False
    assert spec["terminationGracePeriodSeconds"] >= 20
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert str(pod["runAsUser"]) == UID
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in spec["containers"]:
        ctx = container["securityContext"]
        assert ctx["runAsNonRoot"] is True
        assert str(ctx["runAsUser"]) == UID
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert mount_path(sidecar(), "tmp") == "/tmp"


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_kubernetes_pods_mount_every_volume_and_name_keys_that_exist(kind: str) -> None:
    """A volume no container mounts is dead weight, and a ConfigMap item naming a key
    the ConfigMap does not hold keeps the pod from starting (job.yaml had both)."""
    spec = manifests()[kind]["spec"]["template"]["spec"]
    containers = [*spec.get("initContainers", []), *spec["containers"]]
    mounted = {m["name"] for c in containers for m in c.get("volumeMounts", [])}
    declared = {v["name"] for v in spec["volumes"]}
    assert declared == mounted, f"declared {sorted(declared)}, mounted {sorted(mounted)}"
    data = manifests()["ConfigMap"]["data"]
    for v in spec["volumes"]:
        if "configMap" in v:
            missing = [i["key"] for i in v["configMap"].get("items", []) if i["key"] not in data]
            assert not missing, f"volume {v['name']} names keys the ConfigMap lacks: {missing}"


# --- the CI script ----------------------------------------------------------------


def test_check_container_script_is_strict_bash() -> None:
    script = ROOT / ".ci" / "check-container"
    assert os.access(script, os.X_OK)
    text = script.read_text(encoding="utf-8")
    assert "set -euo pipefail" in text
    for tool in ("hadolint", "vendor.compose-spec", "kubernetes-validate --strict"):
        assert tool in text
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)


# --- Kubernetes: the Job with a native sidecar ---------------------------------------


def job_pod() -> dict[str, Any]:
    return dict(manifests()["Job"]["spec"]["template"]["spec"])


def job_volume(name: str) -> dict[str, Any]:
    [found] = [v for v in job_pod()["volumes"] if v["name"] == name]
    return dict(found)


def deployment_doc() -> str:
    """The deployment guide, where the README sends readers for Compose and Kubernetes."""
    return (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")


def documented_command(args: list[str]) -> str:
    """A container's arguments as the deployment guide writes the command line."""
    return " ".join(["marketo-orchestrator", *args])


def hand_over_args(args: list[str]) -> argparse.Namespace:
    """A container's arguments parsed by the real CLI: `submit FILE --route R --wait`."""
    parsed = build_parser(args).parse_args(args)
    assert parsed.command == "submit"
    assert parsed.wait is True
    assert parsed.once is False
    assert parsed.route == "leads"
    return parsed


def test_kubernetes_job_runs_the_orchestrator_as_a_native_sidecar() -> None:
    pod = job_pod()
    assert pod["restartPolicy"] == "Never"
    init, export = pod["initContainers"]  # the sidecar, then the export (runs to its end)
    assert "restartPolicy" not in export
    assert init["restartPolicy"] == "Always"  # Kubernetes 1.29+: a sidecar, not a one-shot
    assert "marketo-orchestrator" in init["image"]
    assert init["args"] == ["run"]
    deployed = sidecar()
    for key in ("env", "ports", "volumeMounts", "securityContext", "livenessProbe"):
        assert init[key] == deployed[key], key
    # The export (and then the hand-over) starts only once the daemon can take files.
    assert init["startupProbe"]["httpGet"] == {"path": "/readyz", "port": PORT}
    [main] = pod["containers"]
    assert mount_path(main, "data") == mount_path(export, "data") == mount_path(init, "data")
    assert mount_path(init, "data") == "/data"
    assert "emptyDir" in job_volume("data")
    assert manifests()["Job"]["spec"]["backoffLimit"] == 0


def test_kubernetes_job_hands_over_with_submit_wait_as_the_docs_show() -> None:
    pod = job_pod()
    [main] = pod["containers"]
    _, export = pod["initContainers"]
    assert main["image"] == sidecar()["image"]  # the orchestrator's image has the CLI
    args = hand_over_args(main["args"])
    assert documented_command(main["args"]) in deployment_doc()
    # It hands over the file the export wrote, and gives up before the Job is killed.
    assert str(args.file) in export["command"]
    deadline = manifests()["Job"]["spec"]["activeDeadlineSeconds"]
    assert 0 < args.timeout < deadline
    assert args.json is True
    env = plain_env(main)
    assert env["ORCHESTRATOR_DATA_DIR"] == "/data" == mount_path(main, "data")
    config_file = f"{mount_path(main, 'config')}/orchestrator.toml"
    assert env["ORCHESTRATOR_CONFIG"] == config_file
    # Only the sidecar talks to Marketo: no secret in the hand-over container.
    assert all("SECRET" not in e["name"] for e in main["env"])
    assert "credentials" not in {m["name"] for m in main["volumeMounts"]}
    assert "hand-over.sh" not in manifests()["ConfigMap"]["data"]


# --- several pipelines on one subscription (issue 21) -------------------------------

COORDINATION = "marketo-orchestrator-coordination"  # coordination-secret.yaml
COORDINATION_ENV = "ORCHESTRATOR_COORDINATION_URL"
SECRET_EXAMPLE = "coordination-secret.yaml"
# A URL whose user part carries a password (scheme://user:password@host).
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/:@'\"]+:[^\s/@'\"]+@", re.IGNORECASE)


def coordination_env(container: dict[str, Any]) -> dict[str, Any]:
    [entry] = [e for e in container["env"] if e["name"] == COORDINATION_ENV]
    return dict(entry)


def test_kubernetes_sidecars_take_the_coordination_url_from_a_secret() -> None:
    example = secret(COORDINATION)
    assert example["file"] == SECRET_EXAMPLE
    [init, _] = job_pod()["initContainers"]
    for container in (sidecar(), init):
        entry = coordination_env(container)
        assert "value" not in entry  # never a plain value: the URL may hold a password
        ref = entry["valueFrom"]["secretKeyRef"]
        assert ref["name"] == example["metadata"]["name"]
        assert ref["key"] in example["stringData"]
        # Without the Secret the sidecar starts and runs alone (one pod per subscription).
        assert ref["optional"] is True
    # Only the sidecars talk to Marketo, so only they coordinate.
    [pipeline] = [c for c in pod_spec()["containers"] if c["name"] == "pipeline"]
    [hand_over] = job_pod()["containers"]
    _, export = job_pod()["initContainers"]
    for container in (pipeline, hand_over, export):
        assert all(e["name"] != COORDINATION_ENV for e in container.get("env", []))


def test_kubernetes_coordination_secret_configures_the_sidecar(tmp_path: Path) -> None:
    toml = tmp_path / "orchestrator.toml"
    toml.write_text(manifests()["ConfigMap"]["data"]["orchestrator.toml"], encoding="utf-8")
    url = secret(COORDINATION)["stringData"]["url"]
    env = {**image_env(), **plain_env(sidecar()), COORDINATION_ENV: url}
    client_secret = manifests()["Secret"]["stringData"]["client_secret"]
    settings = load_with_secret_file(toml, env, client_secret, tmp_path)
    assert settings.coordination.url == url
    assert urlsplit(url).scheme == "postgresql"
    # The Secret left out (optional): the variable is unset and the daemon runs alone.
    alone = load_with_secret_file(
        toml, {**image_env(), **plain_env(sidecar())}, client_secret, tmp_path
    )
    assert alone.coordination.url == ""


def shared_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose()["services"].items() if "profiles" in s}


def test_compose_shared_profile_adds_a_second_orchestrator_and_postgres() -> None:
    services = compose()["services"]
    assert set(shared_services()) == {"orchestrator-2", "postgres"}
    for service in shared_services().values():
        assert service["profiles"] == ["shared"]
    first, second = services["orchestrator"], services["orchestrator-2"]
    assert second["image"] == first["image"]
    assert second["depends_on"] == {
        "simulator": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
    }
    assert second["healthcheck"] == first["healthcheck"]
    assert second["secrets"] == first["secrets"]
    assert second["read_only"] is True
    assert "/tmp" in second["tmpfs"]
    # The same configuration and coordination URL; its own data volume and host port.
    assert second["environment"] == first["environment"]
    assert first["environment"][COORDINATION_ENV] == "${COORDINATION_URL:-}"
    mounts = [dict(v.split(":")[1::-1] for v in s["volumes"]) for s in (first, second)]
    assert mounts[0]["/etc/marketo-orchestrator/orchestrator.toml"] == "./config/compose.toml"
    assert mounts[1]["/etc/marketo-orchestrator/orchestrator.toml"] == "./config/compose.toml"
    assert mounts[0]["/data"] != mounts[1]["/data"]
    assert {mounts[0]["/data"], mounts[1]["/data"]} <= compose()["volumes"].keys()
    assert first["ports"] != second["ports"]
    assert second["ports"] == [f"127.0.0.1:9401:{PORT}"]


def test_compose_shared_profile_points_both_orchestrators_at_the_database(tmp_path: Path) -> None:
    """The URL the header tells you to set loads, and names the postgres service's
    user and database on its port."""
    text = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    [url] = re.findall(r"COORDINATION_URL=(\S+)", text)
    postgres = compose()["services"]["postgres"]
    parts = urlsplit(url)
    assert (parts.hostname, parts.port or 5432) == ("postgres", 5432)
    assert parts.username == postgres["environment"]["POSTGRES_USER"]
    assert parts.path.lstrip("/") == postgres["environment"]["POSTGRES_DB"]
    assert postgres["healthcheck"]["test"] == [
        "CMD",
        "pg_isready",
        "--username",
        parts.username,
        "--dbname",
        parts.path.lstrip("/"),
    ]
    assert "postgres-data:/var/lib/postgresql/data" in postgres["volumes"]
    assert "ports" not in postgres  # reachable on the Compose network only
    demo_secret = (ROOT / "config" / "demo-client-secret.txt").read_text(encoding="utf-8").strip()
    for name in ("orchestrator", "orchestrator-2"):
        env = {**image_env(), **service_env(compose()["services"][name], COORDINATION_URL=url)}
        settings = load_with_secret_file(
            ROOT / "config" / "compose.toml", env, demo_secret, tmp_path
        )
        assert settings.coordination.url == url, name


def password_problems(path: Path) -> list[str]:
    """Passwords written in plain text in a YAML file: a URL with a password in its
    user part, or a key or variable named *PASSWORD* given a value (a *_FILE that
    names a file is fine)."""
    problems = [
        f"{path.name}: a URL with a password"
        for _ in URL_WITH_PASSWORD.finditer(path.read_text(encoding="utf-8"))
    ]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            name = str(node.get("name", ""))
            if "PASSWORD" in name.upper() and "value" in node:
                problems.append(f"{path.name}: {name} has a value")
            for key, value in node.items():
                key_up = str(key).upper()
                if (
                    "PASSWORD" in key_up
                    and not key_up.endswith("_FILE")
                    and isinstance(value, str | int)
                ):
                    problems.append(f"{path.name}: {key} = ...")
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for doc in read_yaml(path):
        walk(doc)
    return problems


def test_no_password_in_plain_text_outside_the_secret_example() -> None:
    files = [ROOT / "docker-compose.yml", *sorted((ROOT / "config" / "kubernetes").glob("*.yaml"))]
    example = ROOT / "config" / "kubernetes" / SECRET_EXAMPLE
    assert example in files
    for path in files:
        if path != example:
            assert password_problems(path) == [], path.name
    # The check sees the example's placeholder, so it would see a real one elsewhere.
    assert password_problems(example) == [f"{SECRET_EXAMPLE}: a URL with a password"] * 2
    assert "REPLACE-ME" in secret(COORDINATION)["stringData"]["url"]
