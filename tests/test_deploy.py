"""The container files, checked by what can check them without Docker.

Dockerfile and compose.yaml are parsed, and every path, port, command, route and module they name is checked
against the repository and the package: the HEALTHCHECK's URL is a route the app serves (its one-liner is run
against a live proxy), the CMD is a console script whose arguments the CLI accepts, the user is not root,
every published port is bound to 127.0.0.1, the mounted config parses and points no provider at the container
itself, and requirements.lock pins exactly what the package needs.
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import json
import re
import shlex
import socket
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml

from proxy.app.cli import build_parser
from proxy.app.config import default_config_text, parse_config
from proxy.app.server import build_app

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- the Dockerfile --------------------------------------------------------------------------------------------


def dockerfile() -> list[list[tuple[str, str]]]:
    """Stages, each a list of (INSTRUCTION, arguments), continuation lines joined and comments dropped."""
    lines, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        lines.append(current)
        current = ""
    stages: list[list[tuple[str, str]]] = [[]]
    for line in lines:
        instruction, _, args = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), args.strip()))
    return stages


def final_stage() -> list[tuple[str, str]]:
    return dockerfile()[-1]


def instruction(stage, name: str) -> list[str]:
    return [args for instr, args in stage if instr == name]


def exec_form(args: str) -> list[str]:
    argv = json.loads(args)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), args
    return argv


def healthcheck_argv() -> list[str]:
    (health,) = instruction(final_stage(), "HEALTHCHECK")
    options, _, command = health.partition("CMD ")
    assert re.fullmatch(r"(--[a-z-]+=\S+\s*)*", options), options
    return exec_form(command)


def health_url() -> str:
    code = healthcheck_argv()[2]
    (url,) = re.findall(r"'(http://[^']+)'", code)
    return url


def test_image_is_built_in_stages_and_runs_as_a_user_that_is_not_root():
    stages = dockerfile()
    froms = [args for stage in stages for instr, args in stage if instr == "FROM"]
    assert len(froms) == 2 and froms[0].endswith(" AS build") and not froms[1].endswith(" AS build")
    assert "--from=build" in " ".join(instruction(final_stage(), "COPY"))
    (user,) = instruction(final_stage(), "USER")
    assert user.split(":")[0] not in ("root", "0") and user.split(":")[1] not in ("root", "0")
    created = " ".join(instruction(final_stage(), "RUN"))
    assert "useradd --system --uid 10001 --user-group" in created and created.endswith(user.split(":")[0])
    order = [instr for instr, _ in final_stage()]
    assert order.index("USER") < order.index("CMD") and order.index("USER") < order.index("HEALTHCHECK")


def test_every_file_the_dockerfile_copies_exists_and_dependencies_come_pinned():
    build = dockerfile()[-2]
    for args in instruction(build, "COPY"):
        *sources, _ = args.split()
        for source in sources:
            assert (ROOT / source).exists(), source
    runs = instruction(build, "RUN")
    assert any(r.endswith("pip install -r requirements.lock") for r in runs)
    assert any("pip install --no-deps ." in r for r in runs)  # the package itself resolves nothing again
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not {"requirements.lock", "pyproject.toml", "README.md", "proxy", "policies"} & set(ignored)


def test_cmd_is_the_console_script_with_arguments_the_cli_takes():
    (cmd,) = instruction(final_stage(), "CMD")
    argv = exec_form(cmd)
    assert argv[0] in PYPROJECT["project"]["scripts"]
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.host) == ("serve", "0.0.0.0")
    (exposed,) = instruction(final_stage(), "EXPOSE")
    assert str(args.port) == exposed == str(urlsplit(health_url()).port)


def test_healthcheck_url_is_a_route_the_app_serves():
    url = urlsplit(health_url())
    assert url.hostname == "127.0.0.1" and url.path == "/healthz"
    app = build_app(parse_config(tomllib.loads(default_config_text()), env={}))
    routes = {r.resource.canonical for r in app.router.routes() if r.method == "GET"}
    assert url.path in routes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _run(argv: list[str]) -> int:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    return await asyncio.wait_for(proc.wait(), timeout=30)


async def test_healthcheck_command_passes_on_a_live_proxy_and_fails_on_a_dead_one(aiohttp_server):
    config = parse_config(tomllib.loads(default_config_text()), env={})
    server = await aiohttp_server(build_app(config, simulate=True))
    argv = healthcheck_argv()
    assert argv[:2] == ["python", "-c"]
    live = argv[2].replace(":8080/", f":{server.port}/")
    dead = argv[2].replace(":8080/", f":{_free_port()}/")
    assert live != argv[2]

    assert await _run([sys.executable, "-c", live]) == 0
    assert await _run([sys.executable, "-c", dead]) != 0


def _lock_module():
    spec = importlib.util.spec_from_file_location("lock_requirements", ROOT / "deploy" / "lock_requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_requirements_lock_pins_exactly_what_the_package_needs():
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            assert re.fullmatch(r"[a-z0-9-]+", name) and re.fullmatch(r"[0-9][0-9a-z.+]*", version), line
            pins[name] = version
    needed = _lock_module().closure()  # pyproject's dependencies and what they pull in, from installed metadata
    assert set(pins) == set(needed)
    for declared in ("opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-grpc", "redis",
                     "opentelemetry-semantic-conventions", "pytest"):
        assert (declared in pins) == (declared != "pytest"), declared  # runtime packages in, test-only out


# --- compose.yaml ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_every_published_port_is_bound_to_loopback(compose):
    published = [(name, p) for name, s in compose["services"].items() for p in s.get("ports", ())]
    assert {name for name, _ in published} == {"proxy", "jaeger", "redis", "prometheus", "grafana"}
    for name, port in published:
        assert isinstance(port, str) and port.startswith("127.0.0.1:") and port.count(":") == 2, (name, port)


def test_every_file_compose_mounts_or_builds_exists(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", ()):
            source = volume.split(":")[0]
            assert source.startswith("./") and (ROOT / source).exists(), (name, volume)
    assert compose["services"]["proxy"]["build"] == "." and (ROOT / "Dockerfile").exists()


def _container_ports(service: dict) -> set[int]:
    return {int(p.rsplit(":", 1)[1]) for p in service.get("ports", ())}


def test_proxy_command_and_config_are_what_the_image_and_the_cli_take(compose):
    proxy = compose["services"]["proxy"]
    script = proxy["command"][2].replace("$$", "$")
    assert proxy["command"][:2] == ["sh", "-c"]
    commands = re.findall(r"exec ([^;]+);", script)
    assert len(commands) == 2 and script.startswith('if [ -n "$GROQ_API_KEY" ]')
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] in PYPROJECT["project"]["scripts"]
        args = build_parser().parse_args(argv[1:])
        assert args.command == "serve" and args.host == "0.0.0.0" and {args.port} == _container_ports(proxy)
    assert [build_parser().parse_args(shlex.split(c)[1:]).simulate for c in commands] == [False, True]

    env = proxy["environment"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in proxy["volumes"]}
    config_file = ROOT / mounts[env["GROQ_PROXY_CONFIG"]]
    config = parse_config(tomllib.loads(config_file.read_text()), env={"GROQ_API_KEY": "gsk_" + "x" * 40})
    assert config.providers["groq"].api_key  # the key compose passes in is the one the config names
    for provider in config.providers.values():
        host = urlsplit(provider.base_url).hostname
        assert host != "localhost" and not (re.fullmatch(r"[\d.:]+", host) and ipaddress.ip_address(host).is_loopback)
        if host == "host.docker.internal":
            assert "host.docker.internal:host-gateway" in proxy["extra_hosts"]


def test_services_compose_names_exist_on_the_ports_they_are_reached_on(compose):
    services = compose["services"]
    otlp = urlsplit(services["proxy"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert otlp.hostname in services and otlp.port in _container_ports(services[otlp.hostname])
    assert otlp.port == 4318  # the built-in exporter speaks OTLP/HTTP
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (target,) = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in services and int(port) in _container_ports(services[host])
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    url = urlsplit(datasource["datasources"][0]["url"])
    assert url.hostname in services and url.port in _container_ports(services[url.hostname])


def test_nothing_claims_or_needs_a_redis_store_that_is_not_configured(compose):
    services = compose["services"]
    assert services["redis"]["profiles"] == ["redis"]  # off by default
    for name, service in services.items():
        if "redis" not in service.get("profiles", ["redis"]):
            assert "redis" not in service.get("depends_on", {}), name
    mounted = tomllib.loads((ROOT / "deploy/compose/groq-proxy.toml").read_text())
    assert "store" not in mounted
    assert "Redis store is configured" not in (ROOT / "compose.yaml").read_text()
