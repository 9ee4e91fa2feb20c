"""The compose services, the Kubernetes workloads and the CLI contract agree: commands and flags, ports,
environment variable names, source names, run names, the Redis URL.

Commands are checked against the contract (deploy_contract.CONTRACT) always, and parsed with the real
argparse parser of the one CLI (``fuseflow.cli.build_parser``).
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from deploy_contract import (
    COMPOSE_FILE,
    CONTRACT_ENV,
    DEPLOY,
    ENV_EXAMPLE,
    GATEWAY_PORT,
    HEALTHCHECK_ENV,
    OVERLAYS,
    ROOT,
    GATEWAY_PORT,
    TEACHER_GRPC_PORT,
    TEACHER_METRICS_PORT,
    TRAINER_METRICS_PORT,
    Invocation,
    compose_role,
    env_of,
    find,
    fuseflow_argv,
    load_compose,
    pod_spec,
    read_env_file,
)

# Stand-ins for Kubernetes' $(VAR) expansion when an argv is handed to a real parser.
K8S_EXPANSIONS = {
    "$(FUSEFLOW_REDIS_URL)": "redis://:pw@redis:6379/0",
    "$(FUSEFLOW_RUN)": "quickstart",
}


# ----------------------------------------------------------------------------------------------------------
# Collecting every `fuseflow` invocation.
# ----------------------------------------------------------------------------------------------------------


def compose_invocations(compose: dict) -> list[Invocation]:
    out = []
    for name, s in compose["services"].items():
        argv = [*s.get("entrypoint", ["fuseflow"]), *s.get("command", [])]
        words = fuseflow_argv(argv)
        if words is not None:
            out.append(Invocation(f"compose {name}", words))
    return out


def k8s_invocations(docs: list[dict], overlay: str) -> list[Invocation]:
    out = []
    for w in docs:
        if w["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        for c in pod_spec(w)["containers"]:
            # No `command`: the image's ENTRYPOINT (fuseflow) runs the args.
            argv = [*c.get("command", ["fuseflow"]), *c.get("args", [])]
            words = fuseflow_argv(argv)
            if words is not None:
                out.append(Invocation(f"k8s {overlay} {w['kind']}/{w['metadata']['name']}", words))
    return out


@pytest.fixture(scope="module")
def invocations(rendered, compose) -> list[Invocation]:
    out = compose_invocations(compose)
    for overlay in OVERLAYS:
        out += k8s_invocations(rendered[overlay], overlay)
    return out


def teacher_deployments(docs: list[dict]) -> list[dict]:
    return [d for d in find(docs, "Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"] == "teacher"]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# ----------------------------------------------------------------------------------------------------------
# Commands.
# ----------------------------------------------------------------------------------------------------------


def test_every_invocation_follows_the_contract(invocations):
    seen = set()
    for inv in invocations:
        positionals, flags, overrides = inv.parse()
        seen.add(inv.command().words)
        if inv.command().words == ("teacher", "serve"):
            # A worker of the run: the source of a run config, with the Redis stream — its URL (which holds the
            # password) from FUSEFLOW_REDIS_URL, never on the command line (issue 15).
            assert {"--config", "--source", "--redis"} <= set(flags) and flags["--redis"] == "", inv.where
            assert "--model" not in flags and flags.get("--engine", "hf") in ("hf", "vllm"), inv.where
            assert int(flags["--port"]) == TEACHER_GRPC_PORT and int(flags["--metrics-port"]) == TEACHER_METRICS_PORT
            assert flags["--host"] == "0.0.0.0", inv.where
        elif inv.command().words == ("train",):
            assert positionals == ["/etc/fuseflow/run.yaml"] and "--redis" not in flags, inv.where
        elif inv.command().words == ("serve-ensemble",):
            # Exposed on the pod's (container's) interfaces: its key from the environment (issue 26).
            assert positionals == ["/etc/fuseflow/ensemble.yaml"] and flags["--host"] == "0.0.0.0", inv.where
            assert int(flags["--port"]) == GATEWAY_PORT and "--api-key" not in flags, inv.where
    assert seen == {("teacher", "serve"), ("train",), ("serve-ensemble",)}
    # 2 teachers + 1 trainer per compose profile and per overlay; a gateway per overlay and the compose cpu
    # profile's (issues 24, 26).
    by_words = lambda words: [i for i in invocations if i.command().words == words]  # noqa: E731
    assert len(by_words(("teacher", "serve"))) + len(by_words(("train",))) == 3 * (2 + len(OVERLAYS))
    gateways = [i.where for i in by_words(("serve-ensemble",))]
    assert len([w for w in gateways if w.startswith("k8s")]) == len(OVERLAYS)
    assert len([w for w in gateways if w.startswith("compose")]) == 1


def _cli_parser_for(words: tuple[str, ...]) -> tuple[argparse.ArgumentParser, str]:
    """The argparse parser that handles ``fuseflow <words>`` (the one CLI's, global flags included) and the
    module that implements the command."""
    from fuseflow.cli import build_parser, commands

    command = commands()[words]
    return build_parser(command), command.impl


@pytest.mark.parametrize("words", [("teacher", "serve"), ("train",), ("serve-ensemble",)], ids=lambda w: "-".join(w))
def test_invocations_parse_with_the_real_cli(invocations, words):
    parser, origin = _cli_parser_for(words)
    for inv in invocations:
        if inv.command().words != words:
            continue
        argv = [K8S_EXPANSIONS.get(a, a) for a in inv.argv[len(words) :]]
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"{inv.where}: {origin} rejects {argv}") from e


# ----------------------------------------------------------------------------------------------------------
# Ports.
# ----------------------------------------------------------------------------------------------------------


def test_compose_ports_match_the_contract(compose):
    for name, s in compose["services"].items():
        if name == "redis":
            continue
        container_ports = {int(p.rsplit(":", 1)[1]) for p in s["ports"]}
        role = compose_role(s)
        expected = {"trainer": {TRAINER_METRICS_PORT}, "gateway": {GATEWAY_PORT}}.get(
            role, {TEACHER_GRPC_PORT, TEACHER_METRICS_PORT})
        assert container_ports == expected, name
        if role == "trainer":
            assert f"localhost:{TRAINER_METRICS_PORT}/metrics" in " ".join(s["healthcheck"]["test"])
        elif role == "gateway":
            assert f"localhost:{GATEWAY_PORT}/healthz" in " ".join(s["healthcheck"]["test"])
        else:
            assert "healthcheck" not in s  # the image's gRPC HEALTHCHECK, on its default port:
    from fuseflow.teacher.healthcheck import DEFAULT_PORT

    assert DEFAULT_PORT == TEACHER_GRPC_PORT


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_ports_match_the_contract(rendered, overlay):
    docs = rendered[overlay]
    for t in teacher_deployments(docs):
        c = pod_spec(t)["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"grpc": TEACHER_GRPC_PORT, "metrics": TEACHER_METRICS_PORT}
        assert int(flag(c["args"], "--port")) == ports["grpc"]
        assert int(flag(c["args"], "--metrics-port")) == ports["metrics"]
        (svc,) = find(docs, "Service", t["metadata"]["name"])
        assert {p["targetPort"] for p in svc["spec"]["ports"]} == set(ports)
        assert svc["spec"]["selector"] == t["spec"]["selector"]["matchLabels"]
    (job,) = find(docs, "Job")
    ports = {p["name"]: p["containerPort"] for p in pod_spec(job)["containers"][0]["ports"]}
    assert ports["metrics"] == TRAINER_METRICS_PORT
    (gw,) = find(docs, "Deployment", "gateway")
    c = pod_spec(gw)["containers"][0]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": GATEWAY_PORT}
    assert int(flag(c["args"], "--port")) == GATEWAY_PORT
    (redis,) = find(docs, "Service", "redis")
    assert redis["spec"]["ports"][0]["port"] == 6379


# ----------------------------------------------------------------------------------------------------------
# Environment variables.
# ----------------------------------------------------------------------------------------------------------


def _fuseflow_env_names(rendered, compose) -> dict[str, str]:
    names = {}
    for name, s in compose["services"].items():
        for key in s.get("environment", {}):
            names.setdefault(key, f"compose {name}")
    for overlay in OVERLAYS:
        for w in rendered[overlay]:
            if w["kind"] in ("Deployment", "Job"):
                for key in env_of(pod_spec(w)["containers"][0]):
                    names.setdefault(key, f"k8s {overlay} {w['metadata']['name']}")
        for cm in find(rendered[overlay], "ConfigMap"):
            if cm["metadata"]["name"].startswith("fuseflow-env"):
                for key in cm["data"]:
                    names.setdefault(key, f"k8s {overlay} ConfigMap fuseflow-env")
    return {k: v for k, v in names.items() if k.startswith("FUSEFLOW_")}


def test_env_names_are_the_contract_names(rendered, compose):
    names = _fuseflow_env_names(rendered, compose)
    unknown = {k: v for k, v in names.items() if k not in CONTRACT_ENV | HEALTHCHECK_ENV}
    assert not unknown, f"FUSEFLOW_* variables outside the CLI contract: {unknown}"
    # Every fuseflow container gets the same contract variables in both systems.
    assert set(names) == CONTRACT_ENV


@pytest.mark.parametrize("name", sorted(CONTRACT_ENV))
def test_contract_env_is_read_by_the_code(name):
    sources = [*(ROOT / "fuseflow").rglob("*.py"), *(ROOT / "services").rglob("*.py")]
    readers = [p for p in sources if f'"{name}"' in p.read_text() and p.name != "healthcheck.py"]
    if not readers:
        pytest.skip(f"{name} is set by the deployment files but nothing in fuseflow/ or services/ reads it yet")
    assert readers


# ----------------------------------------------------------------------------------------------------------
# Sources, run names, Redis.
# ----------------------------------------------------------------------------------------------------------


def _config(text: str, where: str):
    from fuseflow.config import FuseConfig

    try:
        return FuseConfig.model_validate(yaml.safe_load(text))
    except Exception as e:  # noqa: BLE001 - report which file
        raise AssertionError(f"{where}: run config does not validate: {e}") from e


def test_cpu_demo_run_config_is_the_quickstart():
    copy = DEPLOY / "k8s" / "overlays" / "cpu-demo" / "run.yaml"
    assert copy.read_bytes() == (ROOT / "examples" / "quickstart.yaml").read_bytes(), (
        "deploy/k8s/overlays/cpu-demo/run.yaml differs from examples/quickstart.yaml: copy it again"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_teachers_serve_exactly_the_config_sources(rendered, overlay):
    docs = rendered[overlay]
    (cm,) = [c for c in find(docs, "ConfigMap") if c["metadata"]["name"].startswith("fuseflow-run")]
    cfg = _config(cm["data"]["run.yaml"], f"{overlay} ConfigMap")
    served = {}
    for t in teacher_deployments(docs):
        c = pod_spec(t)["containers"][0]
        source = flag(c["args"], "--source")
        assert t["metadata"]["labels"]["fuseflow.dev/source"] == source
        assert flag(c["args"], "--config") == "/etc/fuseflow/run.yaml"
        served[source] = t["metadata"]["name"]
    assert set(served) == {s.key for s in cfg.sources}, f"{overlay}: teachers {served} vs config sources"
    assert cfg.device == ("cuda" if overlay == "gpu" else "cpu")
    # The run name the CLI would derive from the config (run_dir's name) is the one the ConfigMap sets.
    (env_cm,) = [c for c in find(docs, "ConfigMap") if c["metadata"]["name"].startswith("fuseflow-env")]
    assert env_cm["data"]["FUSEFLOW_RUN"] == Path(cfg.run_dir).name


def test_keda_triggers_name_each_teachers_stream_and_group(rendered):
    docs = rendered["gpu"]
    (env_cm,) = [c for c in find(docs, "ConfigMap") if c["metadata"]["name"].startswith("fuseflow-env")]
    run = env_cm["data"]["FUSEFLOW_RUN"]
    deployments = {d["metadata"]["name"]: d for d in teacher_deployments(docs)}
    for so in find(docs, "ScaledObject"):
        target = deployments[so["spec"]["scaleTargetRef"]["name"]]
        (trigger,) = so["spec"]["triggers"]
        # fuseflow.wire.redis_streams: stream work:{run} ({run} a literal hash tag), one group per teacher.
        assert trigger["metadata"]["stream"] == "work:{" + run + "}"
        assert trigger["metadata"]["consumerGroup"] == flag(pod_spec(target)["containers"][0]["args"], "--source")


def test_stream_names_match_the_transport():
    transport = importlib.import_module("fuseflow.wire.redis_streams")

    class NoRedis:
        def register_script(self, script):
            return None

        def xgroup_create(self, *a, **k):
            return None

    t = transport.RedisTransport("redis://unused", "quickstart", ["gemma"], client=NoRedis())
    assert t.k_work == "work:{quickstart}"


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_compose_teachers_serve_exactly_the_config_sources(compose, profile):
    mounts = {}
    sources = set()
    for name, s in compose["services"].items():
        if profile not in s.get("profiles", []) or compose_role(s) == "gateway":
            continue
        (config,) = [v.split(":")[0] for v in s["volumes"] if v.split(":")[1] == "/etc/fuseflow/run.yaml"]
        mounts[name] = config
        if "teacher" in s["command"]:
            sources.add(flag(s["command"], "--source"))
    (config_path,) = set(mounts.values())  # every service of a profile reads the same run config
    path = (COMPOSE_FILE.parent / config_path).resolve()
    expected = ROOT / ("examples/quickstart.yaml" if profile == "cpu" else "deploy/k8s/overlays/gpu/run.yaml")
    assert path == expected.resolve()
    cfg = _config(path.read_text(), str(path))
    assert sources == {s.key for s in cfg.sources}
    run = load_compose()["services"]["cpu-trainer"]["environment"]["FUSEFLOW_RUN"]
    assert run == Path(cfg.run_dir).name


def _role(workload_or_service_name: str) -> str:
    return "trainer" if "trainer" in workload_or_service_name else "teacher"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_urls_point_at_the_redis_service_as_each_roles_acl_user(rendered, overlay, tmp_path):
    import base64

    docs = rendered[overlay]
    (secret,) = find(docs, "Secret")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    (svc,) = find(docs, "Service", "redis")
    for role in ("teacher", "trainer"):
        url = urlparse(data[f"{role}-redis-url"])
        assert (url.scheme, url.hostname, url.port) == ("redis", svc["metadata"]["name"], svc["spec"]["ports"][0]["port"])
        assert (url.username, url.password) == (role, data[f"{role}-redis-password"])
    assert len({data["redis-password"], data["teacher-redis-password"], data["trainer-redis-password"]}) == 3
    assert set(data) == {"redis-password", "teacher-redis-password", "trainer-redis-password", "teacher-redis-url",
                         "trainer-redis-url", "teacher-token", "gateway-api-key"}
    assert data["gateway-api-key"] not in {v for k, v in data.items() if k != "gateway-api-key"}
    for w in find(docs, "Deployment") + find(docs, "Job"):
        env = env_of(pod_spec(w)["containers"][0])
        if w["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway":
            assert "FUSEFLOW_REDIS_URL" not in env  # a gRPC client of the teachers: no Redis login at all
            continue
        key = env["FUSEFLOW_REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"]
        assert key == f"{_role(w['metadata']['name'])}-redis-url", w["metadata"]["name"]


def test_compose_redis_urls_match_the_redis_service_and_the_roles_acl_users():
    env = read_env_file(ENV_EXAMPLE)
    c = load_compose({"REDIS_PASSWORD": "s3cret", "REDIS_TEACHER_PASSWORD": "t3", "REDIS_TRAINER_PASSWORD": "r3"})
    passwords = {"teacher": "t3", "trainer": "r3"}
    for name, s in c["services"].items():
        if name == "redis" or compose_role(s) == "gateway":
            continue
        role = _role(name)
        url = urlparse(s["environment"]["FUSEFLOW_REDIS_URL"])
        assert (url.hostname, url.port, url.username, url.password) == ("redis", 6379, role, passwords[role]), name
        assert not any(p in str(a) for a in s["command"] for p in ("s3cret", "t3", "r3")), \
            f"{name}: a password is on its command line"
    redis_env = c["services"]["redis"]["environment"]
    assert (redis_env["REDIS_PASSWORD"], redis_env["REDIS_TEACHER_PASSWORD"], redis_env["REDIS_TRAINER_PASSWORD"]) == \
        ("s3cret", "t3", "r3")
    assert env["FUSEFLOW_RUN"] == "quickstart"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_gateway_ensemble_is_the_teacher_services_of_the_run(rendered, overlay):
    """The gateway's ensemble.yaml validates, each source is a teacher Service of the overlay on its gRPC port,
    with the tokenizer of the model that teacher serves (the run config's source of the same name)."""
    from fuseflow.ensemble.config import EnsembleConfig

    docs = rendered[overlay]
    (cm,) = [c for c in find(docs, "ConfigMap") if c["metadata"]["name"].startswith("fuseflow-ensemble")]
    ens = EnsembleConfig.model_validate(yaml.safe_load(cm["data"]["ensemble.yaml"]))
    (run_cm,) = [c for c in find(docs, "ConfigMap") if c["metadata"]["name"].startswith("fuseflow-run")]
    run = {s.key: s for s in _config(run_cm["data"]["run.yaml"], f"{overlay} ConfigMap").sources}
    services = {s["metadata"]["name"]: s for s in find(docs, "Service")}
    for src in ens.sources:
        host, port = src.address.rsplit(":", 1)
        svc = services[host]
        assert svc["metadata"]["labels"]["app.kubernetes.io/component"] == "teacher", src.name
        assert int(port) == TEACHER_GRPC_PORT and int(port) in {p["port"] for p in svc["spec"]["ports"]}
        served = svc["metadata"]["labels"]["fuseflow.dev/source"]
        assert src.tokenizer == run[served].model, f"{overlay}: source {src.name} tokenizer vs teacher {served}"
    assert src.token_file is None  # the teachers' token from env FUSEFLOW_TEACHER_TOKEN
