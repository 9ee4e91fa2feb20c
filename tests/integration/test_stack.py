"""``fuseflow stack up``: the commands of every process (a pure function the deployment manifests are checked
against), the status line, and the real stack — Redis, ``fuseflow teacher serve --redis`` per source and
``fuseflow train`` as processes — running a run to completion, and stopping cleanly on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from online_helpers import CHILD_ENV, trained_ids, wait_exit, wait_for, write_run_config

from fuseflow.config import FuseConfig
from fuseflow.stack import Rate, StackPorts, exit_code, format_status, runnable, stack_commands


def _cfg(**over) -> FuseConfig:
    data = {"run_dir": "runs/demo", "target": {"model": "smollm2-135m"},
            "sources": [{"name": "gemma", "model": "gemma3-270m"}, {"model": "smollm2-135m"}]}
    data.update(over)
    return FuseConfig.model_validate(data)


def test_stack_commands_follow_the_cli_contract():
    cmds = stack_commands(_cfg(), "demo", "/etc/fuseflow/run.yaml")
    assert list(cmds) == ["teacher-gemma", "teacher-smollm2-135m", "trainer"]
    assert cmds["teacher-gemma"] == [  # loopback by default; the Redis URL comes from the environment
        "fuseflow", "teacher", "serve", "--config", "/etc/fuseflow/run.yaml", "--source", "gemma", "--engine", "hf",
        "--redis", "--run", "demo", "--host", "127.0.0.1", "--port", "50051", "--metrics-port", "9400",
    ]
    # the second teacher's metrics port skips the trainer's 9401
    assert cmds["teacher-smollm2-135m"][-4:] == ["--port", "50052", "--metrics-port", "9402"]
    assert cmds["trainer"] == [
        "fuseflow", "train", "/etc/fuseflow/run.yaml", "--run", "demo", "--metrics-host", "127.0.0.1",
        "--metrics-port", "9401",
    ]
    assert stack_commands(_cfg(), "demo", host="0.0.0.0")["trainer"][5:7] == ["--metrics-host", "0.0.0.0"]


def test_stack_ports_never_collide():
    for ports in (StackPorts(), StackPorts(6000, 7000, 7002), StackPorts(6000, 7000, 6999)):
        pairs = ports.teacher_ports(5)
        used = [p for pair in pairs for p in pair] + [ports.trainer_metrics]
        assert len(used) == len(set(used)), ports


def test_runnable_uses_this_interpreter_and_the_one_cli():
    assert runnable(["fuseflow", "teacher", "serve", "--port", "1"]) == [
        sys.executable, "-m", "fuseflow.cli", "teacher", "serve", "--port", "1"]
    assert runnable(["fuseflow", "train", "run.yaml"]) == [sys.executable, "-m", "fuseflow.cli", "train", "run.yaml"]
    assert runnable(["fuseflow", "merge", "m.yaml"]) == [sys.executable, "-m", "fuseflow.cli", "merge", "m.yaml"]
    with pytest.raises(ValueError):
        runnable(["python", "x.py"])


def test_status_line_and_rates():
    stats = {"in_flight": 12, "window": 256, "ready": 3, "done": 40, "submitted": 52, "dead_letters": 2}
    line = format_status(stats, {"gemma": 1500.0, "qwen": None}, 820.0, step=7)
    assert line == ("queue: 12/256 in flight, 3 ready, 40/52 done | teachers tok/s: gemma 1.5k, qwen - | "
                    "trainer tok/s: 820 (step 7) | dead letters: 2")
    assert "redis unavailable" in format_status(None, {}, None)
    rate = Rate(window_s=5)
    assert rate.update(0.0, 100.0) is None
    assert rate.update(1.0, 300.0) == pytest.approx(200.0)
    assert rate.update(2.0, 400.0) == pytest.approx(150.0)
    assert rate.update(3.0, 10.0) is None  # a restarted process: its counter starts over
    assert exit_code(-15) == 143 and exit_code(3) == 3


def test_an_in_process_run_leaves_children_no_rendezvous_to_collide_with():
    """The stack's trainer failed with EADDRINUSE on MASTER_PORT after an in-process run in the same process (the
    test session; a notebook): that run wrote RANK=0 and a probed MASTER_PORT into os.environ with its TCPStore
    listening there, so every child inherited "rank 0 of a launched world, on that port". A single process now
    rendezvouses over an in-memory store: no port to probe or inherit."""
    from fuseflow.trainer.loop import init_distributed

    assert init_distributed() == (0, 1)
    assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} & set(os.environ)


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_stack_command() -> list[str]:
    """The README's `fuseflow stack up …` command, as written there."""
    line = next(ln for ln in README.read_text().splitlines() if ln.startswith("fuseflow stack up "))
    return line.split("#")[0].split()


def _free_ports_in_a_row(n: int) -> int:
    """The first of ``n`` consecutive ports free on 127.0.0.1 now. The stack derives its teachers' ports from a base
    (teacher i on base + i), so one free port is not enough: CI once found base + 1 taken by another process."""
    import socket

    from fuseflow.wire.redis_server import free_port

    for _ in range(100):
        base = free_port()
        if base + n > 65535:
            continue
        held = []
        try:
            for port in range(base, base + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports on 127.0.0.1")


def _stack(tmp_path, tiny_llama, tiny_gemma, tiny_qwen) -> tuple[subprocess.Popen, object]:
    """The README's command, run from a folder laid out as the repository (examples/quickstart.yaml with its
    relative run_dir: runs/quickstart), on tiny models: relative paths are what broke it (issue 15)."""
    words = readme_stack_command()
    assert words[:3] == ["fuseflow", "stack", "up"]
    config = write_run_config(tmp_path, tiny_llama, tiny_gemma, tiny_qwen, gemma_max_length=40)
    text = config.read_text().replace(f"run_dir: {tmp_path / 'run'}", "run_dir: runs/quickstart")
    (tmp_path / words[3]).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / words[3]).write_text(text)
    log = tmp_path / "stack.log"
    base = _free_ports_in_a_row(5)  # teacher i serves on teacher-port + i: every port the stack uses checked free
    ports = [str(base), str(base + 2), str(base + 4)]  # gRPC base+0, +1; metrics +2, +3 (teachers), +4 (trainer)
    cmd = [sys.executable, "-m", "fuseflow.cli", *words[1:], "--teacher-port", ports[0],
           "--teacher-metrics-port", ports[1], "--trainer-metrics-port", ports[2], "train.log_every=1",
           "baseline=clm"]  # as the quickstart's: the stack says it trains no baseline (issue 26)
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, **CHILD_ENV),
                                start_new_session=True, cwd=tmp_path)
    return proc, log


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except (FileNotFoundError, PermissionError):
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _pids(log_text: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"started (\S+) \(pid (\d+)\)", log_text)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.integration
@pytest.mark.slow
def test_stack_up_runs_the_real_processes_to_the_end(tmp_path, tiny_llama, tiny_gemma, tiny_qwen):
    proc, log = _stack(tmp_path, tiny_llama, tiny_gemma, tiny_qwen)
    pids = wait_for(lambda: (p := _pids(log.read_text())) and len(p) == 3 and p, 60, "the stack's processes",
                    [(proc, log)])
    # No secret on any command line (`ps` shows them to every local user): the children's URLs and token
    # are in their environment only.
    env = {k: v for pid in pids.values() for k, v in _environ(pid).items()}
    secrets = [env[k] for k in ("FUSEFLOW_REDIS_URL", "FUSEFLOW_TEACHER_TOKEN") if env.get(k)]
    assert len(secrets) == 2 and "@127.0.0.1:" in secrets[0]
    for name, pid in pids.items():
        cmdline = _cmdline(pid)
        assert not any(s in cmdline for s in secrets) and "redis://" not in cmdline, (name, cmdline)
    assert wait_exit(proc, log, 240) == 0, log.read_text()[-4000:]
    text = log.read_text()
    run = tmp_path / "runs" / "quickstart"
    assert set(pids) == {"teacher-gemma", "teacher-qwen", "trainer"}
    assert not any(_alive(p) for p in pids.values()), "a child process outlived the stack"
    assert "queue:" in text and "teachers tok/s: gemma" in text  # the status line
    assert "trainer exited with code 0" in text
    ids = trained_ids(run / "fused")
    dead = (run / "fused" / "dead_letter.jsonl").read_text().splitlines()
    assert ids and len(ids) == len(set(ids)) and dead
    for name in ("teacher-gemma", "teacher-qwen"):  # the real teacher service ran its Redis worker
        teacher_log = (run / "logs" / f"{name}.log").read_text()
        assert "stopped:" in teacher_log
        assert "127.0.0.1" in teacher_log and "bearer token" in teacher_log  # loopback, token required
        assert "NOGROUP" not in teacher_log  # the trainer's reset of a fresh run is atomic (issue 26)
    assert "baseline: clm is not trained by the stack" in text
    assert "note: baseline: clm is not trained by the online trainer" in (run / "logs" / "trainer.log").read_text()
    assert (run / "redis" / "server.conf").exists() and (run / "stack.yaml").exists()
    conf = (run / "redis" / "server.conf").read_text()  # one ACL user per role, confined to the run's keys
    assert "user teacher on" in conf and "user trainer on" in conf and "~work:{quickstart}" in conf
    assert "-@all" in conf and "+@all" not in conf  # allow-lists (issue 26)


@pytest.mark.integration
@pytest.mark.slow
def test_stack_stops_everything_on_sigterm(tmp_path, tiny_llama, tiny_gemma, tiny_qwen):
    proc, log = _stack(tmp_path, tiny_llama, tiny_gemma, tiny_qwen)
    pids = wait_for(lambda: (p := _pids(log.read_text())) and len(p) == 3 and p, 60, "the stack's processes",
                    [(proc, log)])
    proc.send_signal(signal.SIGTERM)
    code = wait_exit(proc, log, 90)
    text = log.read_text()
    assert f"trainer exited with code {code}" in text  # the stack exits with the trainer's code
    assert code == 143  # the trainer was stopped by SIGTERM (128 + 15) before it could finish
    assert not any(_alive(p) for p in pids.values()), "a child process outlived the stack"


def test_a_crashing_teacher_is_restarted_then_reported(tmp_path, monkeypatch):
    from fuseflow import stack

    monkeypatch.setattr(stack, "runnable", lambda argv: [sys.executable, "-c", "import sys; sys.exit(3)"])
    sup = stack.Supervisor({"teacher-a": ["fuseflow", "x"], "trainer": ["fuseflow", "y"]}, tmp_path / "logs")
    sup.start_all()
    with pytest.raises(RuntimeError, match=r"teacher-a exited with code 3 4 times"):
        for _ in range(50):
            for p in sup.procs.values():
                p.wait()
            sup.check_teachers()
    assert sup.restarts["teacher-a"] == stack.TEACHER_RESTARTS
    assert (tmp_path / "logs" / "teacher-a.log").exists()
