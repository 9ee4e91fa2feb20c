"""docker-compose.yml: valid against the compose spec's JSON schema, secrets required, GPUs reserved only
where wanted, both profiles complete. Static only: there is no Docker engine where these run."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml

from deploy_contract import COMPOSE_FILE, ENV_EXAMPLE, GATEWAY_PORT, compose_role, interpolate, load_compose, read_env_file

PROFILES = ("cpu", "gpu")


def compose_schema_path() -> Path | None:
    """The compose spec JSON schema: $FUSEFLOW_COMPOSE_SCHEMA, or the copy inside the `compose` package of
    docker-compose 1.29.2 (PyPI wheel or Debian's docker-compose), which carries compose_spec.json."""
    env = os.environ.get("FUSEFLOW_COMPOSE_SCHEMA")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("compose")
    locations = (spec.submodule_search_locations or []) if spec else []
    candidates = [Path(p) / "config" / "compose_spec.json" for p in locations]
    candidates.append(Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json"))
    return next((p for p in candidates if p.exists()), None)


@pytest.fixture(scope="module")
def validator():
    jsonschema = pytest.importorskip("jsonschema")
    path = compose_schema_path()
    if path is None:
        pytest.skip(
            "no compose spec schema: `pip install --no-deps docker-compose==1.29.2` (its compose/config/"
            "compose_spec.json), or set FUSEFLOW_COMPOSE_SCHEMA to a copy of compose-spec/schema/compose-spec.json"
        )
    schema = json.loads(path.read_text())
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft201909Validator)
    return cls(schema)


def services(compose: dict, profile: str) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items() if profile in s.get("profiles", [profile])}


def test_validates_against_compose_spec(compose, validator):
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)


def test_schema_validation_can_fail(compose, validator):
    bad = copy.deepcopy(compose)
    bad["services"]["redis"]["helthcheck"] = bad["services"]["redis"].pop("healthcheck")
    assert list(validator.iter_errors(bad))


def test_secrets_are_required_and_example_leaves_them_empty():
    env = read_env_file(ENV_EXAMPLE)
    secrets = ("REDIS_PASSWORD", "REDIS_TEACHER_PASSWORD", "REDIS_TRAINER_PASSWORD", "FUSEFLOW_TEACHER_TOKEN",
               "FUSEFLOW_GATEWAY_API_KEY")
    assert all(env[name] == "" for name in secrets)
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    for missing in secrets:
        with pytest.raises(KeyError, match=missing):
            interpolate(raw, {**env, **{name: "x" for name in secrets if name != missing}})
    interpolate(raw, {**env, **{name: "x" for name in secrets}})


def test_every_variable_has_a_value_in_env_example():
    """Every ${VAR} of the compose file is either set in .env.example or has a default."""
    import re

    text = COMPOSE_FILE.read_text()
    env = read_env_file(ENV_EXAMPLE)
    for name, op in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?])?", text):
        assert name in env or op in (":-", "-"), f"${{{name}}} has no default and is not in .env.example"


def test_redis_is_persistent_password_protected_and_healthy(compose):
    redis = compose["services"]["redis"]
    assert "profiles" not in redis  # starts with either profile
    script = " ".join(redis["entrypoint"] + redis["command"])
    assert "--appendonly yes" in script and "--maxmemory-policy noeviction" in script
    assert "requirepass" in script and '"$REDIS_PASSWORD"' in script  # "$$" unescaped: the shell expands it
    assert redis["environment"]["REDIS_PASSWORD"] == "pw"
    assert "pw" not in script  # the password itself never reaches argv
    assert "redis-data:/data" in redis["volumes"]
    assert redis["healthcheck"]["test"][0] == "CMD-SHELL"


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_has_two_teachers_and_a_trainer_after_redis(compose, profile):
    svc = services(compose, profile)
    roles = {n: compose_role(s) for n, s in svc.items() if n != "redis"}
    # The cpu profile also serves the Cool-Fusion gateway over its teachers.
    assert sorted(roles.values()) == sorted(["teacher", "teacher", "trainer"] + (["gateway"] if profile == "cpu" else []))
    for name, s in svc.items():
        if name == "redis" or roles[name] == "gateway":
            continue
        assert s["depends_on"]["redis"]["condition"] == "service_healthy"
        user, password = ("trainer", "rpw") if "train" in s["command"] else ("teacher", "tpw")
        assert s["environment"]["FUSEFLOW_REDIS_URL"] == f"redis://{user}:{password}@redis:6379/0"
        mounts = {v.split(":")[1] for v in s["volumes"]}
        assert {"/etc/fuseflow/run.yaml", "/cache", "/models", "/work/runs"} <= mounts
        image = s["image"]
        assert image.endswith(":cpu" if profile == "cpu" else ":cuda")
        assert s["build"]["dockerfile"] == f"deploy/docker/Dockerfile.{'cpu' if profile == 'cpu' else 'cuda'}"
        assert (COMPOSE_FILE.parent / s["build"]["context"] / s["build"]["dockerfile"]).exists()
        for port in s.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
    trainer = next(n for n, r in roles.items() if r == "trainer")
    for teacher in (n for n, r in roles.items() if r == "teacher"):
        assert svc[trainer]["depends_on"][teacher]["condition"] == "service_healthy"


def test_gateway_runs_after_the_teachers_with_its_key_and_their_token_from_the_environment(compose):
    (name,) = [n for n, s in services(compose, "cpu").items() if n != "redis" and compose_role(s) == "gateway"]
    gateway = compose["services"][name]
    teachers = [n for n, s in services(compose, "cpu").items() if n != "redis" and compose_role(s) == "teacher"]
    assert {t: gateway["depends_on"][t]["condition"] for t in teachers} == dict.fromkeys(teachers, "service_healthy")
    assert gateway["environment"]["FUSEFLOW_GATEWAY_API_KEY"] == "key"
    assert gateway["environment"]["FUSEFLOW_TEACHER_TOKEN"] == "tok"
    assert "FUSEFLOW_REDIS_URL" not in gateway["environment"]  # it needs no Redis
    assert not any(secret in " ".join(gateway["command"]) for secret in ("key", "tok"))
    assert gateway["ports"] == [f"127.0.0.1:{GATEWAY_PORT}:{GATEWAY_PORT}"]
    assert f"localhost:{GATEWAY_PORT}/healthz" in " ".join(gateway["healthcheck"]["test"])
    mounts = {v.split(":")[1]: v.split(":")[0] for v in gateway["volumes"]}
    assert {"/etc/fuseflow/ensemble.yaml", "/cache", "/models"} <= set(mounts)
    # Its sources are the teacher services, which it reaches on the compose network.
    ensemble = yaml.safe_load((COMPOSE_FILE.parent / mounts["/etc/fuseflow/ensemble.yaml"]).read_text())
    addresses = {s["address"] for s in ensemble["sources"]}
    assert addresses == {f"{t}:50051" for t in teachers}


def test_gpus_reserved_in_gpu_profile_only(compose):
    for name, s in services(compose, "cpu").items():
        assert "deploy" not in s, name
    env = read_env_file(ENV_EXAMPLE)
    for name, s in services(compose, "gpu").items():
        if name == "redis":
            continue
        (device,) = s["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert all(d.isdigit() for d in device["device_ids"])
        assert s["shm_size"]
    trainer = compose["services"]["trainer"]
    nproc = next(a for a in trainer["entrypoint"] if a.startswith("--nproc-per-node="))
    assert int(nproc.split("=")[1]) == len(trainer["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"])
    # Defaults spread the three GPU services over distinct GPUs (vLLM claims most of a GPU's memory).
    assert len({env["TEACHER_A_GPU"], env["TEACHER_B_GPU"], env["TRAINER_GPU"]}) == 3


def test_single_gpu_box_puts_everything_on_gpu_zero():
    c = load_compose({"TEACHER_A_GPU": "0", "TEACHER_B_GPU": "0", "TRAINER_GPU": "0"})
    for name in ("teacher-a", "teacher-b", "trainer"):
        assert c["services"][name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["0"]


def test_named_volumes_are_declared(compose):
    declared = set(compose["volumes"])
    for name, s in compose["services"].items():
        for v in s.get("volumes", []):
            source = v.split(":")[0]
            if not source.startswith((".", "/", "$")):
                assert source in declared, f"{name}: volume {source} is not declared"
            elif source.startswith("."):
                assert (COMPOSE_FILE.parent / source).exists(), f"{name}: {source} does not exist"
