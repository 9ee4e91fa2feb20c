"""The docker-compose ``cpu`` profile built and run for real (issue 24): the image, Redis, both teachers, the
trainer and the Cool-Fusion gateway, through the commands of deploy/README.md's compose block, read from there.

On a run config of tiny random models (put into the ``models`` volume) rather than the quickstart's Gemma-3 and
SmolLM2: the stack, its wiring and its faults are what is under test, and two runs of the real models would
take most of CI's time on a 2-core machine (the in-process quickstart alone takes 11 minutes there). The image
still carries and can load the quickstart's models (INSTALL_MODELS=1).

Checked: every training sample is trained exactly once (or dead-lettered with its reason), the fused model and
the report land in the ``runs`` volume; Redis' ACL users confine each role to the run, the teachers require
their token, every port is published on 127.0.0.1 only, no secret is on any command line (``docker inspect``,
the processes' argv); the gateway answers a real ``openai`` client with the API key; ``down -v`` leaves nothing.
A second run SIGKILLs a teacher's process mid-run (as an OOM kill or a crash would: ``docker kill`` counts as
stopping it by hand, and Docker then restarts nothing); the restart policy brings it back and every sample is
still trained exactly once.

Builds images and runs containers for minutes: runs only with ``FUSEFLOW_E2E_COMPOSE=1`` (``.ci/run`` sets it
after building the images) and a Docker engine. Without a registry, ``scripts/local_base_images.sh`` first, and
``FUSEFLOW_PYTHON_IMAGE`` / ``REDIS_IMAGE`` as it prints them.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from deploy_contract import ENV_EXAMPLE, ROOT, read_env_file

pytestmark = [pytest.mark.slow, pytest.mark.integration]

README = ROOT / "deploy" / "README.md"
COMPOSE_WORDS = "docker compose -f deploy/docker/docker-compose.yml --profile cpu"
PROJECT = "fuseflow-e2e"
RUN = "quickstart"  # the README's `docker cp` names the quickstart's run directory
COPY_DEST = ROOT / "runs" / "compose-quickstart"
SECRET_NAMES = ("REDIS_PASSWORD", "REDIS_TEACHER_PASSWORD", "REDIS_TRAINER_PASSWORD", "FUSEFLOW_TEACHER_TOKEN",
                "FUSEFLOW_GATEWAY_API_KEY")
N_DOCS = 100


# ----------------------------------------------------------------------------------------------------------
# The README's commands.
# ----------------------------------------------------------------------------------------------------------


def readme_compose_commands() -> dict[str, str]:
    """The cpu-profile lines of deploy/README.md's compose block, by what they do: up, logs, cp, down."""
    text = README.read_text()
    section = text[text.index("## One machine (docker compose)"):]
    block = section[section.index("```sh") + len("```sh"): section.index("```", section.index("```sh") + 5)]
    out = {}
    for line in block.splitlines():
        command = line.split("  #")[0].strip()
        if COMPOSE_WORDS not in command:
            continue
        if command.startswith(COMPOSE_WORDS):
            key = command[len(COMPOSE_WORDS):].split()[0]
        else:
            key = "cp" if " docker cp " in f" {command} " else command
        out[key] = command
    return out


def test_readme_compose_block_has_the_commands_this_test_runs():
    """Static, always: the README block holds the commands below, so a change there reaches this test."""
    cmds = readme_compose_commands()
    assert set(cmds) == {"up", "logs", "cp", "down"}, cmds
    assert cmds["up"].endswith("up --build -d") and cmds["down"].endswith("down -v")
    assert f":/work/runs/{RUN} runs/compose-quickstart" in cmds["cp"]


def _compose_program() -> str | None:
    """``docker compose`` (the plugin) or ``docker-compose`` (1.29, Debian 12's), whichever runs here."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True, env=_env({})).returncode == 0:
        return "docker compose"
    if shutil.which("docker-compose", path=_env({})["PATH"]):
        return "docker-compose"
    return None


def _env(extra: dict[str, str]) -> dict[str, str]:
    # /usr/bin first: an older docker client elsewhere on PATH (/usr/local/bin on these machines) may shadow the
    # engine's own.
    return dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""), **extra)


# ----------------------------------------------------------------------------------------------------------
# The stack.
# ----------------------------------------------------------------------------------------------------------


class Stack:
    """Runs the README's commands with the test's environment (secrets, run config, project name) in place of
    deploy/docker/.env, and inspects what they started."""

    def __init__(self, env: dict[str, str], compose: str, log_dir: Path):
        self.env, self.compose, self.log_dir = env, compose, log_dir
        self.readme = readme_compose_commands()

    def sh(self, command: str, timeout_s: float = 1800, check: bool = True) -> subprocess.CompletedProcess:
        if self.compose != "docker compose":
            command = command.replace("docker compose ", f"{self.compose} ")
        done = subprocess.run(["bash", "-c", command], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout_s)
        with (self.log_dir / "commands.log").open("a") as f:
            f.write(f"$ {command}\n{done.stdout}{done.stderr}[exit {done.returncode}]\n")
        if check and done.returncode != 0:
            pytest.fail(f"`{command}` exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n"
                        f"{self.logs()}")
        return done

    def docker(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("text", True)
        done = subprocess.run(["docker", *args], env=self.env, capture_output=True, timeout=300, **kw)
        if check and done.returncode != 0:
            pytest.fail(f"docker {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]!r}")
        return done

    def compose_cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.sh(f"{COMPOSE_WORDS} {shlex.join(args)}", check=check, timeout_s=300)

    def logs(self, tail: int = 60) -> str:
        done = self.compose_cmd("logs", "--no-color", "--tail", str(tail), check=False)
        return done.stdout[-12000:]

    def container(self, service: str) -> str:
        cid = self.compose_cmd("ps", "-a", "-q", service).stdout.split()
        assert len(cid) == 1, f"{service}: containers {cid}"
        return cid[0]

    def inspect(self, ref: str) -> dict:
        return json.loads(self.docker("inspect", ref).stdout)[0]

    def project_containers(self) -> list[str]:
        return self.docker("ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}").stdout.split()

    def project_volumes(self) -> list[str]:
        return self.docker("volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}").stdout.split()

    def project_networks(self) -> list[str]:
        return self.docker("network", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}").stdout.split()

    def fill_models_volume(self, files: dict[str, Path]) -> None:
        """The tiny models and the corpus into the ``models`` volume (read-only in the services), through a
        throwaway container of the image, as its unprivileged user."""
        volume = f"{PROJECT}_models"
        self.docker("volume", "create", "--label", f"com.docker.compose.project={PROJECT}",
                    "--label", "com.docker.compose.volume=models", volume)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, path in files.items():
                tar.add(path, arcname=name)
        image = self.env["FUSEFLOW_IMAGE_CPU"]
        self.docker("run", "--rm", "-i", "-v", f"{volume}:/models", "--entrypoint", "tar", image, "-x", "-C",
                    "/models", input=buf.getvalue(), text=False)

    def wait(self, what: str, predicate, timeout_s: float, poll_s: float = 2.0):
        """Poll ``predicate`` until it returns something other than None or False (an exit code 0 counts)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value is not None and value is not False:
                return value
            time.sleep(poll_s)
        pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{self.logs()}")

    def state(self, service: str) -> dict:
        return self.inspect(self.container(service))["State"]

    def trainer_done(self) -> int | None:
        """The trainer's exit code once it has exited; fails at once if it crashed (its restart policy would
        restart it for ever)."""
        info = self.inspect(self.container("cpu-trainer"))
        if info["RestartCount"] > 0 or info["State"]["Restarting"]:
            trainer_log = self.docker("logs", "--tail", "40", info["Id"]).stderr
            pytest.fail(f"the trainer crashed and was restarted {info['RestartCount']} times:\n{trainer_log[-6000:]}")
        return info["State"]["ExitCode"] if info["State"]["Status"] == "exited" else None

    def up(self) -> None:
        self.sh(self.readme["up"])

    def copy_run(self, dest: Path) -> Path:
        """The README's `docker cp` of the run directory, then moved out of the checkout to ``dest``."""
        self.sh(self.readme["cp"])
        shutil.move(str(COPY_DEST), dest)
        return dest

    def down(self) -> None:
        self.sh(self.readme["down"], timeout_s=300)


def _metric(url: str, name: str) -> float | None:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:  # noqa: S310 - the stack's own loopback port
            text = resp.read().decode()
    except OSError:
        return None
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, flags=re.MULTILINE)
    return float(m.group(1)) if m else None


_WORDS = ("alpha beta gamma delta value return import class lambda yield while print string number list "
          "tuple module object method attribute function default keyword python error raise").split()


def _write_corpus(path: Path, n_docs: int) -> Path:
    """JSONL of short documents of 3-12 words (tests/integration/online_helpers.py's corpus): 13-47 tokens of
    the tiny SentencePiece tokenizer, so gemma's max_length 40 rejects a few."""
    import numpy as np

    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for i in range(n_docs):
            words = rng.choice(_WORDS, size=int(rng.integers(3, 13)))
            f.write(json.dumps({"text": f"Doc {i}: " + " ".join(words) + "."}) + "\n")
    return path


@pytest.fixture(scope="module")
def engine():
    """Skips (with the reason) unless asked for and a Docker engine and compose run here."""
    if os.environ.get("FUSEFLOW_E2E_COMPOSE") != "1":
        pytest.skip("builds images and runs the compose stack for minutes: set FUSEFLOW_E2E_COMPOSE=1 (.ci/run does)")
    if shutil.which("docker", path=_env({})["PATH"]) is None:
        pytest.skip("no docker client: apt-get install -y docker.io docker-compose")
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, env=_env({}))
    if info.returncode != 0:
        pytest.skip(f"no Docker engine answers (`docker info`: {info.stderr.strip()[-200:]}); start dockerd")
    compose = _compose_program()
    if compose is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    return compose


@pytest.fixture(scope="module")
def e2e(engine, request, tiny_llama, tiny_gemma, tiny_qwen):
    """Run config, corpus, secrets, environment and the expected sample ids of the compose runs."""
    from fuseflow.config import FuseConfig, load_config
    from fuseflow.models import load_tokenizer
    from fuseflow.trainer.data import prepare_corpus

    if COPY_DEST.exists():
        pytest.fail(f"{COPY_DEST} exists (a copy from an earlier compose run): move it away, the README's "
                    "`docker cp` writes there")
    # Not under pytest's basetemp: another pytest session of the same user rotates those folders away, and a
    # bind-mounted run config that vanishes comes back to a restarted container as an empty directory.
    work = Path(tempfile.mkdtemp(prefix="fuseflow-compose-e2e-"))
    request.addfinalizer(lambda: shutil.rmtree(work, ignore_errors=True))
    corpus = _write_corpus(work / "corpus.jsonl", N_DOCS)
    # Container paths: the models volume holds the tiny models and the corpus. gemma's max_length 40 rejects a
    # few samples (dead letters); a window of 8 keeps the teachers close behind the trainer, so a teacher killed
    # mid-run holds work; reclaim after 5 s.
    text = f"""
run_dir: runs/{RUN}
target: {{model: /models/tiny-llama}}
sources:
  - {{name: gemma, model: /models/tiny-gemma, max_length: 40}}
  - {{name: smollm, model: /models/tiny-qwen}}
corpus: {{source: /models/corpus.jsonl, held_out_documents: 2}}
align: {{vocab_map: mined, sequence: offsets}}
fusion: {{top_k: 4, lam: 0.5}}
train: {{max_length: 48, micro_batch_size: 2, lr: 1.0e-3, checkpoint_every: 2, warmup_ratio: 0.0,
        max_dead_letter_fraction: 0.5}}
online: {{window: 8, reclaim_idle_s: 5}}
eval: {{max_length: 48, before: false}}
baseline: none
"""
    config = work / "run.yaml"
    config.write_text(text)
    config.chmod(0o644)  # read by the containers' unprivileged user
    host = load_config(FuseConfig, config, [f"target.model={tiny_llama}", f"corpus.source={corpus}"])
    expected = sorted(s.id for s in prepare_corpus(host, load_tokenizer(host.target.model)).train)
    env = read_env_file(ENV_EXAMPLE)
    env.update({name: secrets.token_hex(16) for name in SECRET_NAMES})
    # The registry-less stand-ins where the environment names them (.ci/run: scripts/local_base_images.sh).
    env.update({k: os.environ[k] for k in ("FUSEFLOW_PYTHON_IMAGE", "REDIS_IMAGE", "FUSEFLOW_IMAGE_CPU")
                if os.environ.get(k)})
    env.update(COMPOSE_PROJECT_NAME=PROJECT, FUSEFLOW_RUN=RUN, FUSEFLOW_CPU_CONFIG=str(config),
               FUSEFLOW_CPU_ENGINE="hf")
    files = {"corpus.jsonl": corpus}
    for name, path in (("tiny-llama", tiny_llama), ("tiny-gemma", tiny_gemma), ("tiny-qwen", tiny_qwen)):
        files[name] = shutil.copytree(path, work / "models" / name)
    stack = Stack(_env(env), engine, work)
    stack.compose_cmd("down", "-v", check=False)  # leftovers of an interrupted earlier run
    stack.compose_cmd("build")  # cached after .ci/run's build; the image must exist to fill the models volume
    return {"stack": stack, "expected": expected, "files": files, "work": work, "env": env}


def _check_run(run_dir: Path, expected: list[str]) -> tuple[list[str], set[str]]:
    fused = run_dir / "fused"
    ids = [i for p in sorted(fused.glob("trained_samples*.log")) for i in p.read_text().split()]
    dead = {json.loads(line)["sample"] for line in (fused / "dead_letter.jsonl").read_text().splitlines()}
    assert ids and dead, "the run trained samples and dead-lettered those too long for gemma"
    assert len(ids) == len(set(ids)), f"trained twice: {sorted({i for i in ids if ids.count(i) > 1})}"
    assert sorted(ids) == sorted(i for i in expected if i not in dead), "a sample was lost or invented"
    assert (fused / "model" / "model.safetensors").exists() and (fused / "model" / "config.json").exists()
    assert (run_dir / "report.json").exists(), sorted(p.name for p in run_dir.iterdir())
    return ids, dead


def _check_nothing_left(stack: Stack) -> None:
    assert stack.project_containers() == [], "containers outlived `down -v`"
    assert stack.project_volumes() == [], "volumes outlived `down -v`"
    assert stack.project_networks() == [], "networks outlived `down -v`"


def _check_security(stack: Stack, env: dict[str, str]) -> None:
    """ACL users, token, loopback publishing, no secret on a command line — inside compose."""
    secret_values = [env[name] for name in SECRET_NAMES]
    services = ["redis", "cpu-teacher-gemma", "cpu-teacher-smollm", "cpu-trainer", "cpu-gateway"]
    for service in services:
        info = stack.inspect(stack.container(service))
        argv = [info["Path"], *info["Args"], *(info["Config"]["Cmd"] or []), *(info["Config"]["Entrypoint"] or []),
                *((info["Config"].get("Healthcheck") or {}).get("Test") or [])]
        leaked = [n for n, v in zip(SECRET_NAMES, secret_values) if any(v in a for a in argv)]
        assert not leaked, f"{service}: {leaked} on its command line (docker inspect)"
        for host_port in (info["HostConfig"]["PortBindings"] or {}).values():
            assert all(b["HostIp"] == "127.0.0.1" for b in host_port), f"{service} publishes beyond loopback"
        if info["State"]["Running"]:  # the processes' own argv, as `ps` in the container shows them
            top = stack.docker("top", info["Id"], "-o", "pid,args").stdout
            assert not any(v in top for v in secret_values), f"{service}: a secret in a process's argv"
    assert not stack.inspect(stack.container("redis"))["HostConfig"]["PortBindings"], "Redis is published"

    redis = stack.container("redis")

    def cli(user: str | None, password: str | None, *args: str) -> str:
        auth = ["-e", f"REDISCLI_AUTH={password}"] if password else []
        who = ["--user", user] if user else []
        prefix = [] if password else ["env", "-u", "REDISCLI_AUTH"]
        done = stack.docker("exec", *auth, redis, *prefix, "valkey-cli", *who, *args, check=False)
        return done.stdout + done.stderr  # valkey-cli reports a failed AUTH on stderr

    assert "NOAUTH" in cli(None, None, "PING")  # the default user needs its password
    for user, var in (("teacher", "REDIS_TEACHER_PASSWORD"), ("trainer", "REDIS_TRAINER_PASSWORD")):
        assert cli(user, env[var], "XLEN", f"work:{{{RUN}}}").strip().isdigit(), user  # its run's keys: yes
        assert cli(user, env[var], "PING").strip() == "PONG", user
        assert "NOPERM" in cli(user, env[var], "XLEN", "work:{another-run}"), user  # another run's: no
        assert "NOPERM" in cli(user, env[var], "CONFIG", "GET", "requirepass"), user
        assert "WRONGPASS" in cli(user, "not-" + env[var], "PING"), user
    for user, var in (("teacher", "REDIS_TEACHER_PASSWORD"), ("trainer", "REDIS_TRAINER_PASSWORD")):
        for command in (["SCAN", "0"], ["RANDOMKEY"], ["DBSIZE"], ["SCRIPT", "FLUSH"], ["FLUSHALL"]):
            assert "NOPERM" in cli(user, env[var], *command), (user, command)  # allow-lists (issue 26)

    from fuseflow.wire.client import TeacherClient, TeacherError

    with TeacherClient("127.0.0.1:50051", token="not-the-token", timeout_s=30) as client:
        with pytest.raises(TeacherError, match="UNAUTHENTICATED"):
            client.info()
    for port, name in ((50051, "gemma"), (50052, "smollm")):
        with TeacherClient(f"127.0.0.1:{port}", token=env["FUSEFLOW_TEACHER_TOKEN"], timeout_s=30) as client:
            info = client.info()
            assert (info.model, info.tokenizer) == (name, f"/models/tiny-{'gemma' if name == 'gemma' else 'qwen'}")


def _check_gateway(stack: Stack, env: dict[str, str]) -> None:
    """A real OpenAI client from the host, with the key, through the published port."""
    import openai

    stack.wait("the gateway to be healthy", lambda: stack.state("cpu-gateway").get("Health", {}).get("Status") ==
               "healthy", 300)
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=env["FUSEFLOW_GATEWAY_API_KEY"],
                           timeout=120, max_retries=0)
    assert {m.id for m in client.models.list().data} == {"cool-fusion", "gemma", "smollm"}
    done = client.completions.create(model="cool-fusion", prompt="def value(self):", max_tokens=8)
    assert isinstance(done.choices[0].text, str) and done.usage.completion_tokens > 0
    # Chat through one served source (gemma's max_length of 40 tokens cannot hold its chat prompt here).
    chat = client.chat.completions.create(model="smollm", max_tokens=6,
                                          messages=[{"role": "user", "content": "Say alpha."}])
    assert isinstance(chat.choices[0].message.content, str)
    # The gateway takes its key from the environment (issue 26): a wrong one is a 401.
    wrong = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


# ----------------------------------------------------------------------------------------------------------
# The runs.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(1800)
def test_compose_cpu_profile_trains_every_sample_once_and_serves_the_gateway(e2e):
    stack, env = e2e["stack"], e2e["env"]
    t0 = time.monotonic()
    try:
        stack.fill_models_volume(e2e["files"])
        stack.up()
        _check_security(stack, env)
        _check_gateway(stack, env)
        code = stack.wait("the trainer to finish", stack.trainer_done, 900)
        assert code == 0, stack.logs()
        run_dir = stack.copy_run(e2e["work"] / "run1")
    finally:
        elapsed = time.monotonic() - t0
        stack.down()
    print(f"compose run: {elapsed:.0f} s from up to the copied run")
    _check_run(run_dir, e2e["expected"])
    _check_nothing_left(stack)


@pytest.mark.timeout(1800)
def test_a_killed_teacher_comes_back_and_every_sample_is_still_trained_once(e2e):
    stack = e2e["stack"]
    try:
        stack.fill_models_volume(e2e["files"])
        stack.up()
        def step_two_or_later() -> float | None:
            step = _metric("http://127.0.0.1:9401/metrics", "fuseflow_trainer_step")
            return step if step is not None and step >= 2 else None

        step = stack.wait("the trainer's second step", step_two_or_later, 600, poll_s=0.5)
        victim = stack.container("cpu-teacher-gemma")
        # SIGKILL to the container's process, as the kernel's OOM killer or a crash ends it. `docker kill` would
        # mark the container stopped by hand, and no restart policy restarts that.
        os.kill(stack.inspect(victim)["State"]["Pid"], signal.SIGKILL)
        stack.wait("the killed teacher to be restarted", lambda: stack.inspect(victim)["RestartCount"] >= 1, 120)
        assert stack.trainer_done() is None, "the run was over before the kill: nothing was tested"
        code = stack.wait("the trainer to finish", stack.trainer_done, 900)
        assert code == 0, stack.logs()
        teacher_log = stack.docker("logs", victim).stdout + stack.docker("logs", victim).stderr
        run_dir = stack.copy_run(e2e["work"] / "run2")
    finally:
        stack.down()
    ids, dead = _check_run(run_dir, e2e["expected"])
    assert step * 2 < len(ids), f"killed at step {step} of {len(ids) / 2:.0f}: not mid-run"
    assert teacher_log.count("worker gemma/") >= 2, "the teacher's worker did not start again"
    print(f"teacher killed at step {step:.0f} of {len(ids) / 2:.0f}; {len(ids)} samples trained once, {len(dead)} "
          f"dead-lettered; restarted teacher took over stale work: {'took over' in teacher_log}")
    _check_nothing_left(stack)
