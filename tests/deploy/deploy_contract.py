"""The service CLI contract the deployment files are written against, as data, and helpers shared by the
tests in this folder: rendering the kustomize overlays, reading the compose file as compose does.

The contract (fixed by the lead; the commands are built in parallel):

    fuseflow teacher serve  [--config RUN.yaml --source NAME | --model MODEL [--engine hf|vllm]]
                            [--host 0.0.0.0] [--port 50051] [--metrics-port 9400] [--redis [URL]] [--run RUN]
                            [--tls-cert F --tls-key F] [--token-file F]
                            [--max-texts 256] [--max-tokens 16384] [--max-top-k 64]
    fuseflow query --address HOST:PORT [--token T] [--tls-ca F] {info | tokenize | score | generate}
    fuseflow train RUN.yaml [--redis URL] [--metrics-host H] [key=value ...]
    fuseflow stack up RUN.yaml [--redis URL] [--host H] [key=value ...]

Secrets never on a command line: a bare ``--redis`` (teacher) or none (trainer) reads ``FUSEFLOW_REDIS_URL``.
    fuseflow serve-ensemble ENSEMBLE.yaml [--host 127.0.0.1] [--port 8000] [--api-key-file F]
                            (the API key from FUSEFLOW_GATEWAY_API_KEY or --api-key-file, never argv; issue 26)
    fuseflow fuse RUN.yaml [key=value ...]
    fuseflow merge MERGE.yaml
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu-demo", "gpu")
COMPOSE_FILE = DEPLOY / "docker" / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / "docker" / ".env.example"

# Ports and environment variables of the contract.
TEACHER_GRPC_PORT = 50051
TEACHER_METRICS_PORT = 9400
TRAINER_METRICS_PORT = 9401
GATEWAY_PORT = 8000
CONTRACT_ENV = {
    "FUSEFLOW_REDIS_URL",
    "FUSEFLOW_RUN",
    "FUSEFLOW_TEACHER_TOKEN",
    "FUSEFLOW_GATEWAY_API_KEY",
    "FUSEFLOW_LOG_FORMAT",
    "FUSEFLOW_CACHE",
}
# Read by the image's healthcheck module (services/teacher/healthcheck.py), not by the CLI.
HEALTHCHECK_ENV = {"FUSEFLOW_TEACHER_PORT"}
HEALTH_SERVICE = "fuseflow.v1.TeacherService"


@dataclass(frozen=True)
class Command:
    """One command of the contract: its words, positionals (min, max; None = unbounded) and flags taking a
    value (``optional``: those whose value may be left out). ``overrides``: trailing ``key=value`` arguments
    allowed."""

    words: tuple[str, ...]
    positionals: tuple[int, int | None] = (0, 0)
    flags: frozenset[str] = field(default_factory=frozenset)
    overrides: bool = False
    optional: frozenset[str] = field(default_factory=frozenset)


CONTRACT = {
    c.words: c
    for c in [
        Command(
            ("teacher", "serve"),
            flags=frozenset(
                "--config --source --model --engine --host --port --metrics-port --redis --run --tls-cert "
                "--tls-key --token-file --max-texts --max-tokens --max-top-k".split()
            ),
            optional=frozenset({"--redis"}),
        ),
        Command(("train",), positionals=(1, 1), flags=frozenset({"--redis", "--metrics-host"}), overrides=True),
        Command(("stack", "up"), positionals=(1, 1), flags=frozenset({"--redis", "--host"}), overrides=True),
        Command(("serve-ensemble",), positionals=(1, 1), flags=frozenset({"--host", "--port", "--api-key-file"})),
        Command(("fuse",), positionals=(1, 1), overrides=True),
        Command(("merge",), positionals=(1, 1)),
    ]
}


@dataclass
class Invocation:
    """``fuseflow`` argv found in a deployment file, after any launcher (torchrun) in front of it."""

    where: str  # e.g. "compose cpu-teacher-gemma", "k8s gpu Deployment/teacher-gemma"
    argv: list[str]  # the words after `fuseflow`

    def command(self) -> Command:
        for n in (2, 1):
            if tuple(self.argv[:n]) in CONTRACT:
                return CONTRACT[tuple(self.argv[:n])]
        raise AssertionError(f"{self.where}: `fuseflow {' '.join(self.argv[:2])}` is not a command of the contract")

    def parse(self) -> tuple[list[str], dict[str, str], list[str]]:
        """(positionals, flags, overrides) against the contract; raises AssertionError naming the file."""
        cmd = self.command()
        rest = self.argv[len(cmd.words) :]
        positionals: list[str] = []
        flags: dict[str, str] = {}
        overrides: list[str] = []
        i = 0
        while i < len(rest):
            word = rest[i]
            if word.startswith("--"):
                name, eq, value = word.partition("=")
                assert name in cmd.flags, f"{self.where}: {name} is not a flag of `fuseflow {' '.join(cmd.words)}`"
                if not eq and name in cmd.optional and (i + 1 == len(rest) or rest[i + 1].startswith("--")):
                    value = ""  # a bare flag: its value comes from the environment
                elif not eq:
                    assert i + 1 < len(rest), f"{self.where}: {name} needs a value"
                    value = rest[i + 1]
                    i += 1
                flags[name] = value
            elif "=" in word and cmd.overrides and not word.startswith("/"):
                overrides.append(word)
            else:
                positionals.append(word)
            i += 1
        lo, hi = cmd.positionals
        assert lo <= len(positionals) and (hi is None or len(positionals) <= hi), (
            f"{self.where}: `fuseflow {' '.join(cmd.words)}` takes {lo}..{hi} positionals, got {positionals}"
        )
        return positionals, flags, overrides


def fuseflow_argv(argv: list[str]) -> list[str] | None:
    """The words after ``fuseflow`` (directly, or behind ``torchrun ... --no-python fuseflow``); None if the
    argv does not run fuseflow."""
    if "fuseflow" in argv:
        return argv[argv.index("fuseflow") + 1 :]
    return None


def compose_role(service: dict) -> str:
    """``teacher``, ``trainer`` or ``gateway``: what a compose service of a fuseflow image runs."""
    command = service.get("command", [])
    if "serve-ensemble" in command:
        return "gateway"
    return "trainer" if "train" in command else "teacher"


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    """Resources of ``kind`` (and ``name``) among rendered manifests."""
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def pod_spec(resource: dict) -> dict:
    """The pod spec of a Deployment, StatefulSet or Job."""
    return resource["spec"]["template"]["spec"]


def env_of(container: dict) -> dict[str, dict]:
    """A container's ``env`` as {name: entry}."""
    return {e["name"]: e for e in container.get("env", [])}


# ----------------------------------------------------------------------------------------------------------
# kustomize.
# ----------------------------------------------------------------------------------------------------------


def kustomize_command() -> list[str] | None:
    """``kustomize build`` if installed, else ``kubectl kustomize`` (kubectl embeds kustomize), else None."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render_overlay(overlay: str, workdir: Path) -> list[dict]:
    """Render ``deploy/k8s/overlays/<overlay>`` from a copy in ``workdir`` (the gpu overlay's secrets.env is
    made from its example there, never in the source tree)."""
    cmd = kustomize_command()
    assert cmd is not None
    tree = workdir / "k8s"
    if not tree.exists():
        shutil.copytree(K8S, tree)
        example = tree / "overlays" / "gpu" / "secrets.env.example"
        secrets = tree / "overlays" / "gpu" / "secrets.env"
        if not secrets.exists():
            shutil.copy(example, secrets)
    done = subprocess.run([*cmd, str(tree / "overlays" / overlay)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(cmd)} {overlay} failed:\n{done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


# ----------------------------------------------------------------------------------------------------------
# Compose: ${VAR} substitution as compose does it, from .env.example.
# ----------------------------------------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution (``$$``, ``${V}``, ``${V:-d}``, ``${V-d}``, ``${V:?e}``, ``${V?e}``,
    ``$V``) applied to every string of a loaded compose file; ``${V:?e}`` raises ``KeyError(e)``."""

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        v = env.get(name)
        if op == ":-":
            return v if v else arg
        if op == "-":
            return arg if v is None else v
        if op == ":?" and not v or op == "?" and v is None:
            raise KeyError(f"{name}: {arg}")
        return v or ""

    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, str):
        return _VAR.sub(one, value)
    return value


def load_compose(env_overrides: dict[str, str] | None = None) -> dict:
    """docker-compose.yml with YAML merges resolved and variables substituted from .env.example, with dummy
    secrets filled in (the example leaves them empty on purpose)."""
    env = read_env_file(ENV_EXAMPLE)
    env.update({"REDIS_PASSWORD": "pw", "REDIS_TEACHER_PASSWORD": "tpw", "REDIS_TRAINER_PASSWORD": "rpw",
                "FUSEFLOW_TEACHER_TOKEN": "tok", "FUSEFLOW_GATEWAY_API_KEY": "key"})
    env.update(env_overrides or {})
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), env)
