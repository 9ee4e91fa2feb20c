"""Redis ACL users per role in the manifests (issues 15, 26): the Redis of the Kubernetes base (and of the compose
file) creates the users ``teacher`` and ``trainer`` with exactly the lines ``scripts/acl_lines.py`` makes from
the rules ``fuseflow stack up`` gives them (:func:`fuseflow.wire.redis_streams.run_acl_rules`), and the script
that does it really confines each role, and lets it do its work, when run against a real server."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import yaml

from deploy_contract import K8S, ROOT, find, load_compose, pod_spec

sys.path.insert(0, str(ROOT / "scripts"))
from acl_lines import acl_lines  # noqa: E402 - the generator of the manifests' lines

RUN = "quickstart"
_USER_LINE = re.compile(r"printf 'user \w+ on >%s %s\\n' \"\$REDIS_\w+_PASSWORD\" \"[^\"]*\";")


def compose_script() -> str:
    service = load_compose()["services"]["redis"]
    return " ".join(service["command"])


def k8s_base_script() -> str:
    """The Redis start script of deploy/k8s/base/redis.yaml as the container's shell gets it."""
    docs = [d for d in yaml.safe_load_all((K8S / "base" / "redis.yaml").read_text()) if d]
    (sts,) = find(docs, "StatefulSet", "redis")
    c = pod_spec(sts)["containers"][0]
    assert c["command"] == ["sh", "-c"]
    return " ".join(c["args"])


def k8s_script(docs: list[dict]) -> str:
    (sts,) = find(docs, "StatefulSet", "redis")
    return " ".join(pod_spec(sts)["containers"][0]["args"])


def user_lines(script: str) -> list[str]:
    return _USER_LINE.findall(script)


def test_k8s_redis_creates_the_stacks_acl_users(rendered):
    scripts = {"k8s base": k8s_base_script(), **{f"k8s {o}": k8s_script(docs) for o, docs in rendered.items()}}
    for where, script in scripts.items():
        assert user_lines(script) == acl_lines(), (
            f"{where}: the ACL users drifted from run_acl_rules: paste `python scripts/acl_lines.py` into "
            "deploy/k8s/base/redis.yaml"
        )


def test_compose_redis_creates_the_stacks_acl_users():
    assert user_lines(compose_script()) == acl_lines()  # compose's $$ is $ once loaded


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_the_manifest_redis_confines_each_role_and_lets_a_run_through(tmp_path):
    from fuseflow.wire.redis_server import RedisServerError, find_server_binary
    from fuseflow.wire.redis_streams import RedisTransport
    from fuseflow.wire.transport import TransportRefused

    try:
        binary = Path(find_server_binary())
    except RedisServerError as e:
        pytest.skip(str(e))
    port = _free_port()
    script = k8s_base_script().replace("/tmp/auth.conf", str(tmp_path / "auth.conf")).replace("--dir /data", f"--dir {tmp_path}")
    assert "exec valkey-server " in script
    script = script.replace("exec valkey-server ", f"exec {binary} ") + f" --port {port} --bind 127.0.0.1 --save ''"
    env = dict(os.environ, REDIS_PASSWORD="admin-pw", REDIS_TEACHER_PASSWORD="teacher-pw",
               REDIS_TRAINER_PASSWORD="trainer-pw", FUSEFLOW_RUN=RUN)
    log = open(tmp_path / "redis.log", "wb")
    proc = subprocess.Popen(["sh", "-c", script], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"redis://{{}}:{{}}-pw@127.0.0.1:{port}/0"
        clients = {user: redis.Redis(port=port, username=user, password=f"{user}-pw") for user in ("teacher", "trainer")}
        admin = redis.Redis(port=port, password="admin-pw")
        deadline = time.monotonic() + 20
        while True:
            try:
                admin.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, (tmp_path / "redis.log").read_text()
                assert time.monotonic() < deadline, "the manifest's Redis did not start"
                time.sleep(0.1)
        assert (tmp_path / "auth.conf").stat().st_mode & 0o077 == 0  # umask 077: passwords readable by Redis only
        # A run goes through with the manifest's users: reset, dispatch, answer, read, ack.
        import numpy as np

        from fuseflow.sparse import AlignedDist, Sample

        trainer = RedisTransport(url.format("trainer", "trainer"), RUN, ["gemma"])
        trainer.authenticate(b"k" * 32)
        trainer.reset()
        trainer.submit([Sample("s0", "text")])
        teacher = RedisTransport(url.format("teacher", "teacher"), RUN, ["gemma"])
        (item,) = teacher.claim_work("gemma", "w0", 1, 50)
        dist = AlignedDist(ids=np.zeros((2, 1), np.int32), logprobs=np.zeros((2, 1), np.float32),
                           gold_logprobs=np.zeros(2, np.float32), aligned=np.ones(2, bool))
        teacher.complete_work("gemma", item, dist=dist)
        (ready,) = trainer.next_ready("rank0", 1, 50)
        trainer.ack_ready([ready])
        assert trainer.stats()["done"] == 1
        with pytest.raises(TransportRefused):
            teacher.reset()
        for user, client in clients.items():
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.xadd("work:{another-run}", {"id": user})
            for command in (("CONFIG", "GET", "requirepass"), ("RANDOMKEY",), ("DBSIZE",), ("SCAN", "0"),
                            ("SCRIPT", "FLUSH"), ("FUNCTION", "FLUSH"), ("KEYS", "*")):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    client.execute_command(*command)
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port, username="teacher", password="trainer-pw").ping()
        teacher.close()
        trainer.close()
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
