"""Redis ACL users per role in the manifests (issue 15): the Redis of the compose file and of the Kubernetes
base creates the users ``teacher`` and ``trainer`` with the rules ``fuseflow stack up`` gives them
(:func:`fuseflow.wire.redis_streams.run_acl_rules`), and the script that does it really confines each role
when run against a real server."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

from deploy_contract import find, load_compose, pod_spec

from fuseflow.wire.redis_streams import run_acl_rules

RUN = "quickstart"
# printf 'user NAME on >%s RULES\n' "$REDIS_NAME_PASSWORD" "$FUSEFLOW_RUN"
_USER_LINE = re.compile(r"printf 'user (\w+) on >%s (.*?)\\n' \"\$(REDIS_\w+_PASSWORD)\" \"\$FUSEFLOW_RUN\"")


def compose_script() -> str:
    service = load_compose()["services"]["redis"]
    return " ".join(service["command"])


def k8s_script(docs: list[dict]) -> str:
    (sts,) = find(docs, "StatefulSet", "redis")
    return " ".join(pod_spec(sts)["containers"][0]["args"])


def acl_users(script: str) -> dict[str, tuple[str, str]]:
    """{user: (rules with the run filled in, password variable)} of a Redis start script."""
    return {name: (rules.replace("{%s}", "{" + RUN + "}"), var) for name, rules, var in _USER_LINE.findall(script)}


def test_compose_and_k8s_redis_create_the_stacks_acl_users(rendered):
    scripts = {"compose": compose_script(), **{f"k8s {o}": k8s_script(docs) for o, docs in rendered.items()}}
    for where, script in scripts.items():
        users = acl_users(script)
        assert set(users) == {"teacher", "trainer"}, where
        for role, (rules, var) in users.items():
            assert rules == run_acl_rules(RUN, role), f"{where}: the {role} user's rules drifted from run_acl_rules"
            assert var == f"REDIS_{role.upper()}_PASSWORD", where
    assert len(set(scripts.values())) == 1  # one script, so the live test below covers every manifest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_the_manifest_redis_confines_each_role_to_the_run(tmp_path):
    from fuseflow.wire.redis_server import RedisServerError, find_server_binary

    try:
        binary = Path(find_server_binary())
    except RedisServerError as e:
        pytest.skip(str(e))
    port = _free_port()
    script = compose_script().replace("/tmp/auth.conf", str(tmp_path / "auth.conf")).replace("--dir /data", f"--dir {tmp_path}")
    assert "exec valkey-server " in script
    script = script.replace("exec valkey-server ", f"exec {binary} ") + f" --port {port} --bind 127.0.0.1 --save ''"
    env = dict(os.environ, REDIS_PASSWORD="admin-pw", REDIS_TEACHER_PASSWORD="teacher-pw",
               REDIS_TRAINER_PASSWORD="trainer-pw", FUSEFLOW_RUN=RUN)
    log = open(tmp_path / "redis.log", "wb")
    proc = subprocess.Popen(["sh", "-c", script], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
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
        for user, client in clients.items():
            client.xadd(f"work:{{{RUN}}}", {"id": user})
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.xadd("work:{another-run}", {"id": user})
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.config_get("requirepass")
        assert admin.xlen(f"work:{{{RUN}}}") == 2
        assert clients["trainer"].scan(match=f"*{{{RUN}}}*")[1]  # the trainer resets the run: it may SCAN
        with pytest.raises(redis.exceptions.NoPermissionError):
            clients["teacher"].scan(match=f"*{{{RUN}}}*")
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port, username="teacher", password="trainer-pw").ping()
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
