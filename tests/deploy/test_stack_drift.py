"""No drift between `fuseflow stack up` and the Docker Compose `cpu` profile: each compose service runs the
argv that :func:`fuseflow.stack.stack_commands` gives for the same run config, up to what a container
changes by design — it binds 0.0.0.0 on its own network namespace (so every teacher uses the default ports
inside its container), and it gets the run name from ``FUSEFLOW_RUN`` instead of ``--run``. Both argvs are
parsed with the real CLI parsers and every other parsed option must be equal."""

from __future__ import annotations

from pathlib import Path

import pytest
from deploy_contract import compose_role, load_compose

from fuseflow.cli import build_parser, commands
from fuseflow.config import FuseConfig, load_config
from fuseflow.stack import stack_commands

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "docker" / "docker-compose.yml"
CONTAINER_ONLY = {"host", "port", "metrics_host", "metrics_port", "run"}


def _parse(argv: list[str]) -> dict:
    words = tuple(argv[:2] if argv[0] == "teacher" else argv[:1])
    parser = build_parser(commands()[words])
    args = vars(parser.parse_args(argv[len(words):]))  # a config field's flag: under its field (serve.port)
    return {k: v for k, v in args.items() if k.rsplit(".", 1)[-1] not in CONTAINER_ONLY}


@pytest.mark.parametrize("engine", [None, "hf", "vllm"])
def test_compose_cpu_profile_runs_the_stack_commands(engine):
    """With .env.example's settings, and with FUSEFLOW_CPU_ENGINE set: the compose teachers then run on that
    engine, as `fuseflow stack up CONFIG sources.<i>.engine=ENGINE` would."""
    compose = load_compose({} if engine is None else {"FUSEFLOW_CPU_ENGINE": engine})
    # The gateway is no part of `stack up` (it serves inference over the teachers).
    services = {name: svc for name, svc in compose["services"].items()
                if "cpu" in svc.get("profiles", []) and compose_role(svc) != "gateway"}
    mounted = next(v for svc in services.values() for v in svc.get("volumes", []) if v.endswith(":/etc/fuseflow/run.yaml:ro"))
    host_path, config_path = mounted.split(":")[:2]
    overrides = [] if engine is None else [f"sources.{i}.engine={engine}" for i in range(len(services) - 1)]
    cfg = load_config(FuseConfig, (COMPOSE.parent / host_path).resolve(), overrides)
    assert {svc["build"]["args"]["ENGINE"] for svc in services.values()} == {engine or "hf"}  # the image has it
    env = next(iter(services.values()))["environment"]
    redis_url = env["FUSEFLOW_REDIS_URL"]
    run = env["FUSEFLOW_RUN"]
    assert redis_url.startswith("redis://")  # every process gets it from the environment, none in its argv
    expected = stack_commands(cfg, run, config_path)
    assert {f"cpu-{name}" for name in expected} == set(services)
    for name, argv in expected.items():
        got = [str(a) for a in services[f"cpu-{name}"]["command"]]
        assert argv[0] == "fuseflow"
        assert _parse(got) == _parse(argv[1:]), f"cpu-{name} drifted from stack_commands()['{name}']"
        assert run == Path(cfg.run_dir).name  # what `stack up` derives from the same config
