"""The container files, checked by what can check them without Docker.

Dockerfile and compose.yaml are parsed, and every path, port, command, route and module they name is checked
against the repository and the package: the HEALTHCHECK's URL is a route the app serves (its one-liner is run
against a live proxy), the CMD is a console script whose arguments the CLI accepts, the user is not root,
every published port is bound to 127.0.0.1, the mounted config parses and points no provider at the container
itself, and requirements.lock pins exactly what the package needs.

The Kubernetes manifests (deploy/kubernetes/) are validated against the Kubernetes API schemas that the
`kubernetes-validate` package ships (offline, strict: a misspelt field fails), and checked against the package:
the ConfigMap's config loads with the proxy's own loader and the Secret's keys, the command is one the CLI takes,
the probes are routes that answer on a proxy started from that config, and the grace period covers the drain.
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
    assert {name for name, _ in published} == {"lb", "jaeger", "prometheus", "grafana"}
    for name, port in published:
        assert isinstance(port, str) and port.startswith("127.0.0.1:") and port.count(":") == 2, (name, port)


def test_every_file_compose_mounts_or_builds_exists(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", ()):
            source = volume.split(":")[0]
            assert source.startswith("./") and (ROOT / source).exists(), (name, volume)
    assert compose["services"]["proxy"]["build"] == "." and (ROOT / "Dockerfile").exists()


def _container_ports(service: dict) -> set[int]:
    """The ports a service listens on: those it publishes and those it only exposes to the others."""
    return {int(p.rsplit(":", 1)[1]) for p in service.get("ports", ())} | {int(p) for p in service.get("expose", ())}


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
    (discovery,) = prometheus["scrape_configs"][0]["dns_sd_configs"]  # each replica scraped on its own
    (host,) = discovery["names"]
    assert discovery["type"] == "A" and host in services and discovery["port"] in _container_ports(services[host])
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    url = urlsplit(datasource["datasources"][0]["url"])
    assert url.hostname in services and url.port in _container_ports(services[url.hostname])


def _nginx_directives(text: str) -> list[tuple[str, list[str]]]:
    """nginx.conf as (directive, arguments), comments dropped; blocks opened and closed as "{" and "}"."""
    text = re.sub(r"#[^\n]*", "", text)
    out = []
    for statement in re.findall(r"[^;{}]+[;{]|}", text):
        words = shlex.split(statement.rstrip(";{").strip()) if statement != "}" else ["}"]
        if words:
            out.append((words[0], words[1:]))
    return out


def test_two_replicas_share_redis_behind_one_port(compose):
    services = compose["services"]
    proxy, lb, redis = services["proxy"], services["lb"], services["redis"]
    assert proxy["deploy"]["replicas"] == 2 and "ports" not in proxy  # replicas cannot share a published port
    assert "profiles" not in redis and "ports" not in redis
    assert proxy["depends_on"]["redis"] == {"condition": "service_healthy"}

    mounts = {v.split(":")[1]: v.split(":")[0] for v in lb["volumes"]}
    directives = _nginx_directives((ROOT / mounts["/etc/nginx/nginx.conf"]).read_text())
    servers = [args for name, args in directives if name == "server" and args and ":" in args[0]]
    assert [a[0] for a in servers] == ["proxy:8080"] and "resolve" in servers[0][1:]
    host, port = servers[0][0].split(":")
    assert host in services and int(port) in _container_ports(services[host])
    (listen,) = [args for name, args in directives if name == "listen"]
    assert {int(listen[0])} == {int(p.rsplit(":", 1)[1]) for p in lb["ports"]}
    assert ("proxy_buffering", ["off"]) in directives  # streams are not held back
    assert sum(1 for d in directives if d[0] == "}") == 5  # events, http, upstream, server, location: all closed

    config = parse_config(tomllib.loads((ROOT / "deploy/compose/groq-proxy.toml").read_text()),
                          env={"GROQ_API_KEY": "gsk_" + "x" * 40})
    grace = re.fullmatch(r"(\d+)s", proxy["stop_grace_period"])
    drain = getattr(config.server, "drain_s", 5.0) + getattr(config.server, "drain_timeout_s", 30.0)
    assert grace and int(grace.group(1)) >= drain + 5  # SIGKILL only after the whole drain and a margin
    store = config.policies.store
    url = urlsplit(store.url)
    assert store.backend == "redis" and config.policies.uses_store
    assert url.hostname in services and url.port in _container_ports(services[url.hostname])


# --- Kubernetes ------------------------------------------------------------------------------------------------

KUBE = ROOT / "deploy" / "kubernetes"


@pytest.fixture(scope="module")
def kube() -> dict[str, dict]:
    """Every manifest the kustomization lists, by kind."""
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in KUBE.glob("*.yaml")
                                                       if p.name != "kustomization.yaml")
    documents = {}
    for name in kustomization["resources"]:
        (doc,) = list(yaml.safe_load_all((KUBE / name).read_text()))
        assert doc["kind"] not in documents
        documents[doc["kind"]] = doc
    return documents


@pytest.mark.parametrize("version", ["1.25.0", "1.37.0"])
def test_every_manifest_is_valid_against_the_kubernetes_schema(kube, version):
    import kubernetes_validate  # the schemas ship in the package: no download

    for kind, doc in kube.items():
        kubernetes_validate.validate(doc, version, strict=True)  # strict: an unknown or misspelt field fails


def test_schema_check_catches_a_misspelt_field(kube):
    import copy

    import kubernetes_validate

    broken = copy.deepcopy(kube["Deployment"])
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["httpGet"]["paht"] = container["readinessProbe"]["httpGet"].pop("path")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.37.0", strict=True)


def _container(kube) -> dict:
    (container,) = kube["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def _secret_env(kube) -> dict[str, str]:
    return dict(kube["Secret"]["stringData"])


def _configmap_config(kube, tmp_path, env: dict):
    """The ConfigMap's file, written where the pod would see it and read by the proxy's own loader."""
    from proxy.app.config import load_config

    container = _container(kube)
    args = build_parser().parse_args(container["command"][1:])
    (mount,) = [m for m in container["volumeMounts"] if args.config.startswith(m["mountPath"].rstrip("/") + "/")]
    (volume,) = [v for v in kube["Deployment"]["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == kube["ConfigMap"]["metadata"]["name"] and mount["readOnly"]
    key = args.config[len(mount["mountPath"].rstrip("/")) + 1:]
    path = tmp_path / key
    path.write_text(kube["ConfigMap"]["data"][key])
    return load_config(path, env=env)


def test_configmap_config_loads_with_the_keys_from_the_secret(kube, tmp_path):
    container = _container(kube)
    assert container["envFrom"] == [{"secretRef": {"name": kube["Secret"]["metadata"]["name"]}}]
    config = _configmap_config(kube, tmp_path, _secret_env(kube))
    assert config.providers["groq"].api_key == _secret_env(kube)["GROQ_API_KEY"]
    assert config.server.admin_key == _secret_env(kube)["GROQ_PROXY_ADMIN_KEY"]
    assert config.policies.store.backend == "redis" and config.policies.uses_store  # replicas share their counters
    assert config.policies.store.url == _secret_env(kube)["GROQ_PROXY_REDIS_URL"]
    assert "replace-me" not in kube["ConfigMap"]["data"]["groq-proxy.toml"]  # no secret in the ConfigMap
    with pytest.raises(Exception, match="GROQ_PROXY_REDIS_URL is not set"):
        _configmap_config(kube, tmp_path, {k: v for k, v in _secret_env(kube).items() if k != "GROQ_PROXY_REDIS_URL"})


def test_deployment_command_ports_and_probes_are_the_proxys(kube):
    container = _container(kube)
    argv = container["command"]
    assert argv[0] in PYPROJECT["project"]["scripts"]
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.host) == ("serve", "0.0.0.0")
    (port,) = container["ports"]
    assert port["containerPort"] == args.port == int(instruction(final_stage(), "EXPOSE")[0])
    app = build_app(parse_config(tomllib.loads(default_config_text()), env={}))
    routes = {r.resource.canonical for r in app.router.routes() if r.method == "GET"}
    probes = {name: container[name]["httpGet"] for name in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz" and probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert probe["path"] in routes and probe["port"] == port["name"]
    service = kube["Service"]["spec"]
    assert [p["targetPort"] for p in service["ports"]] == [port["name"]]


def test_deployment_runs_as_the_images_user_with_nothing_to_spare(kube):
    pod = kube["Deployment"]["spec"]["template"]["spec"]
    created = " ".join(instruction(final_stage(), "RUN"))
    uid = int(re.search(r"--uid (\d+)", created).group(1))
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == uid
    security = _container(kube)["securityContext"]
    assert security == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]}}


def test_termination_grace_covers_prestop_and_the_whole_drain(kube, tmp_path):
    pod = kube["Deployment"]["spec"]["template"]["spec"]
    pre_stop = _container(kube)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and pre_stop[1].isdigit()
    server = _configmap_config(kube, tmp_path, _secret_env(kube)).server
    # The drain keys' defaults (issue: 5 and 30) until the drain lands in the config this branch reads.
    drain = getattr(server, "drain_s", 5.0) + getattr(server, "drain_timeout_s", 30.0)
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + drain + 5  # a margin for the exit


def test_service_pdb_and_autoscaler_point_at_the_deployment(kube):
    deployment = kube["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert kube["Service"]["spec"]["selector"].items() <= labels.items()
    assert kube["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = kube["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    hpa = kube["HorizontalPodAutoscaler"]["spec"]
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    assert kube["PodDisruptionBudget"]["spec"]["maxUnavailable"] < hpa["minReplicas"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == _container(kube)["ports"][0]["containerPort"]
    app = build_app(parse_config(tomllib.loads(default_config_text()), env={}))
    assert annotations["prometheus.io/path"] in {r.resource.canonical for r in app.router.routes()}


async def test_probes_answer_on_a_proxy_started_from_the_configmap(kube, tmp_path, aiohttp_server, redis_url):
    env = {**_secret_env(kube), "GROQ_PROXY_REDIS_URL": redis_url}
    config = _configmap_config(kube, tmp_path, env)
    server = await aiohttp_server(build_app(config, simulate=True))
    container = _container(kube)
    async with aiohttp.ClientSession() as session:
        for name in ("readinessProbe", "livenessProbe"):
            async with session.get(f"http://127.0.0.1:{server.port}{container[name]['httpGet']['path']}") as resp:
                assert resp.status == 200, name
        async with session.get(f"http://127.0.0.1:{server.port}/readyz") as resp:
            assert (await resp.json())["store"]["status"] == "ok"
