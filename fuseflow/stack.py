"""``fuseflow stack up RUN.yaml``: the online system as processes on one machine.

A Redis server (started here, with its append-only file under ``run_dir/redis``, unless ``--redis URL`` is
given), one ``fuseflow teacher serve --redis`` per source and the ``fuseflow train`` trainer, with a status
line refreshed every second. Ctrl-C or SIGTERM stops everything (trainer first, then teachers, then Redis);
the exit code is the trainer's. Running it again on the same ``run_dir`` resumes the run.

The exact command of every process is :func:`stack_commands`, a pure function: the Docker Compose and
Kubernetes manifests are checked against it, so the three ways to run the stack do not drift apart.

Secure by default (issue 15): every port binds 127.0.0.1 unless ``--host`` says otherwise; secrets travel in
the children's environment, never on a command line (``ps`` shows argv to every local user): the Redis URL
(``FUSEFLOW_REDIS_URL``) and a bearer token generated for this stack (``FUSEFLOW_TEACHER_TOKEN``, which the
teachers then require). A Redis started here has one ACL user per role (``teacher``, ``trainer``:
:func:`fuseflow.wire.redis_streams.run_acl_rules`), each allowed only the commands its role sends on the run's
keys (issue 26), with its own password.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from fuseflow.config import FuseConfig, dump_config, load_config

log = logging.getLogger(__name__)

# Each stack_commands argv starts with the `fuseflow` console script; locally it runs as this interpreter's
# `python -m fuseflow.cli` (no PATH lookup, same environment), the one wrapper of every command.
TEACHER_RESTARTS = 3  # a crashed teacher is restarted this often (its pending work is reclaimed meanwhile)


@dataclass(frozen=True)
class StackPorts:
    """Ports of the local stack: teacher ``i`` serves gRPC on ``teacher + i`` and metrics on the ``i``-th port
    from ``teacher_metrics`` that is not the trainer's (9400, 9402, 9403, … by default)."""

    teacher: int = 50051
    teacher_metrics: int = 9400
    trainer_metrics: int = 9401

    def teacher_ports(self, n: int) -> list[tuple[int, int]]:
        metrics, p = [], self.teacher_metrics
        while len(metrics) < n:
            if p != self.trainer_metrics:
                metrics.append(p)
            p += 1
        return [(self.teacher + i, metrics[i]) for i in range(n)]


def stack_commands(
    cfg: FuseConfig, run: str, config_path: str | os.PathLike = "run.yaml", ports: StackPorts = StackPorts(),
    host: str = "127.0.0.1",
) -> dict[str, list[str]]:
    """The argv of every process of the stack, by name: ``teacher-<source>`` per source (config order), then
    ``trainer``. ``config_path`` is where every process reads the run config (overrides already applied).
    No secret is in them: each process reads the Redis URL from ``FUSEFLOW_REDIS_URL`` (a bare ``--redis``
    for a teacher) and the teachers their token from ``FUSEFLOW_TEACHER_TOKEN``."""
    config_path = str(config_path)
    cmds: dict[str, list[str]] = {}
    for src, (port, metrics_port) in zip(cfg.sources, ports.teacher_ports(len(cfg.sources))):
        cmds[f"teacher-{src.key}"] = [
            "fuseflow", "teacher", "serve", "--config", config_path, "--source", src.key, "--engine", src.engine,
            "--redis", "--run", run, "--host", host, "--port", str(port), "--metrics-port", str(metrics_port),
        ]
    cmds["trainer"] = [
        "fuseflow", "train", config_path, "--run", run, "--metrics-host", host,
        "--metrics-port", str(ports.trainer_metrics),
    ]
    return cmds


def runnable(argv: list[str]) -> list[str]:
    """A :func:`stack_commands` argv as this interpreter runs it: ``python -m fuseflow.cli <args>``."""
    if not argv or argv[0] != "fuseflow":
        raise ValueError(f"not a fuseflow command: {argv}")
    return [sys.executable, "-m", "fuseflow.cli", *argv[1:]]


def exit_code(returncode: int) -> int:
    """A ``Popen.returncode`` as a shell reports it: killed by signal N → 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


# ----------------------------------------------------------------------------------------------------------
# Status line
# ----------------------------------------------------------------------------------------------------------


# The trainer's dispatch window, as its rank 0 exports it (the stack's own transport has only a default).
TRAINER_WINDOW = 'fuseflow_trainer_queue{kind="window"}'


def _sample_key(name: str, labels: dict[str, str]) -> str:
    """``name`` or ``name{k="v",…}`` (labels sorted): how :func:`scrape` names a sample."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def scrape(url: str, names: set[str], timeout_s: float = 0.5) -> dict[str, float] | None:
    """Values of the samples ``names`` at a Prometheus endpoint, each a bare name (unlabelled) or
    ``name{k="v",…}`` (labels sorted); None if the endpoint does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - our own loopback endpoint
            text = resp.read().decode()
    except OSError:
        return None
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = _sample_key(sample.name, sample.labels)
            if key in names:
                out[key] = sample.value
    return out


class Rate:
    """Per-second rate of a counter over the last ``window_s`` seconds of observations."""

    def __init__(self, window_s: float = 5.0):
        self.window_s = window_s
        self.points: list[tuple[float, float]] = []

    def update(self, t: float, value: float | None) -> float | None:
        if value is None:
            return None
        if self.points and value < self.points[-1][1]:  # the process restarted: its counter too
            self.points.clear()
        self.points.append((t, value))
        while len(self.points) > 2 and t - self.points[1][0] >= self.window_s:
            self.points.pop(0)
        (t0, v0), (t1, v1) = self.points[0], self.points[-1]
        return (v1 - v0) / (t1 - t0) if t1 > t0 else None


def _fmt_rate(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r / 1000:.1f}k" if r >= 1000 else f"{r:.0f}"


def format_status(stats: dict | None, teacher_tok_s: dict[str, float | None], trainer_tok_s: float | None,
                  step: float | None = None) -> str:
    """One status line: queue depth, per-teacher and trainer tokens/s, dead letters. ``stats['window']``
    None (not known yet) shows the samples in flight alone."""
    if stats is None:
        queue = "queue: redis unavailable"
    else:
        window = "" if stats["window"] is None else f"/{stats['window']}"
        queue = (f"queue: {stats['in_flight']}{window} in flight, {stats['ready']} ready, "
                 f"{stats['done']}/{stats['submitted']} done")
    teachers = ", ".join(f"{name} {_fmt_rate(r)}" for name, r in teacher_tok_s.items())
    dead = "-" if stats is None else str(stats["dead_letters"])
    step_s = "" if step is None else f" (step {int(step)})"
    return (f"{queue} | teachers tok/s: {teachers} | trainer tok/s: {_fmt_rate(trainer_tok_s)}{step_s} "
            f"| dead letters: {dead}")


# ----------------------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------------------


class Supervisor:
    """The stack's child processes: started in their own sessions (a Ctrl-C reaches the stack, which stops
    them in order), output to ``log_dir/<name>.log``; crashed teachers restarted up to ``TEACHER_RESTARTS``."""

    def __init__(self, commands: dict[str, list[str]], log_dir: Path, env: dict[str, dict[str, str]] | None = None):
        self.commands = commands
        self.log_dir = Path(log_dir)
        self.env = env or {}  # by process name: its environment (None: this process's)
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, int] = {}

    def start(self, name: str) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(
                runnable(self.commands[name]), stdout=out, stderr=subprocess.STDOUT, env=self.env.get(name),
                start_new_session=True,
            )
        self.procs[name] = proc
        log.info("started %s (pid %d), log %s", name, proc.pid, self.log_dir / f"{name}.log")
        return proc

    def start_all(self) -> None:
        for name in self.commands:  # teachers first: the trainer's first samples find them loading already
            self.start(name)

    def check_teachers(self) -> None:
        for name, proc in list(self.procs.items()):
            if name == "trainer" or proc.poll() is None:
                continue
            n = self.restarts.get(name, 0)
            if n >= TEACHER_RESTARTS:
                raise RuntimeError(f"{name} exited with code {exit_code(proc.returncode)} {n + 1} times; "
                                   f"see {self.log_dir / (name + '.log')}")
            self.restarts[name] = n + 1
            log.warning("%s exited with code %d; restarting (%d of %d)", name, exit_code(proc.returncode), n + 1,
                        TEACHER_RESTARTS)
            self.start(name)

    def stop(self, names: list[str], timeout_s: float = 30.0) -> None:
        """SIGTERM ``names`` together, SIGKILL what is still running after ``timeout_s``."""
        procs = [self.procs[n] for n in names if n in self.procs and self.procs[n].poll() is None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def run_stack(
    cfg: FuseConfig,
    redis_url: str | None = None,
    run: str | None = None,
    ports: StackPorts = StackPorts(),
    status_out: TextIO | None = None,
    status_every_s: float = 1.0,
    stop_event: threading.Event | None = None,
    host: str = "127.0.0.1",
) -> int:
    """Start the stack for ``cfg`` and wait for the trainer; returns its exit code (see the module docstring).
    ``stop_event`` (set by the signal handlers of :func:`main`) stops the stack early."""
    from fuseflow.wire.redis_server import RedisServer
    from fuseflow.wire.redis_streams import RedisTransport, run_acl_rules

    stop_event = stop_event or threading.Event()
    status_out = status_out or sys.stdout
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = cfg.run_name(run)
    config_path = run_dir / "stack.yaml"  # every process reads the same config, overrides applied
    config_path.write_text(dump_config(cfg))
    server = None
    if redis_url is None:
        # Loopback only; the default user's password keeps other local users' clients out, and each role
        # gets a user of its own, confined to the run's keys.
        users = {role: (secrets.token_hex(16), run_acl_rules(run, role)) for role in ("teacher", "trainer")}
        server = RedisServer(data_dir=run_dir / "redis", appendonly=True, password=secrets.token_hex(16),
                             users=users).start()
        urls = {role: server.url_for(role) for role in users}
        log.info("Redis on 127.0.0.1:%d (append-only file in %s)", server.port, server.data_dir)
    else:
        urls = {"teacher": redis_url, "trainer": redis_url}
    commands = stack_commands(cfg, run, config_path, ports, host)
    if cfg.baseline == "clm":  # the trainer says it again under its table (logs/trainer.log)
        log.info("baseline: clm is not trained by the stack (its trainer trains the fused target only); "
                 "`fuseflow fuse %s` trains the CLM baseline row", config_path)
    token = os.environ.get("FUSEFLOW_TEACHER_TOKEN") or secrets.token_urlsafe(24)  # the teachers require it
    env = {name: dict(os.environ, FUSEFLOW_REDIS_URL=urls["trainer" if name == "trainer" else "teacher"],
                      FUSEFLOW_TEACHER_TOKEN=token) for name in commands}
    sup = Supervisor(commands, run_dir / "logs", env)
    teachers = [s.key for s in cfg.sources]
    teacher_metrics = {s.key: m for s, (_, m) in zip(cfg.sources, ports.teacher_ports(len(teachers)))}
    rates = {t: Rate() for t in teachers}
    trainer_rate = Rate()
    tty = status_out.isatty()
    transport = None
    code = None
    try:
        transport = RedisTransport(urls["trainer"], run, teachers)
        sup.start_all()
        last_print = 0.0
        while not stop_event.wait(status_every_s):
            trainer = sup.procs["trainer"]
            if trainer.poll() is not None:
                code = exit_code(trainer.returncode)
                break
            sup.check_teachers()
            now = time.monotonic()
            line = status_line(transport, teacher_metrics, rates, trainer_rate, ports.trainer_metrics, now)
            if tty:
                status_out.write("\r\033[K" + line)
                status_out.flush()
            elif now - last_print >= 10 * status_every_s:  # a log file: a line every 10 refreshes
                status_out.write(line + "\n")
                status_out.flush()
                last_print = now
        if tty:
            status_out.write("\n")
    finally:
        if code is None:
            log.info("stopping the stack")
        sup.stop(["trainer"])
        sup.stop([n for n in commands if n != "trainer"])
        if transport is not None:
            transport.close()
        if server is not None:
            server.stop()
    if code is None:
        code = exit_code(sup.procs["trainer"].returncode) if "trainer" in sup.procs else 1
    log.info("trainer exited with code %d", code)
    return code


def status_line(transport, teacher_metrics: dict[str, int], rates: dict, trainer_rate: Rate, trainer_port: int,
                now: float) -> str:
    """The status line now: the run's queue from Redis, tokens/s and the window from the processes' metrics."""
    from fuseflow.wire.transport import TransportUnavailable

    try:
        stats = transport.stats()
    except TransportUnavailable:
        stats = None
    teacher_tok_s = {}
    for name, port in teacher_metrics.items():
        got = scrape(f"http://127.0.0.1:{port}/metrics", {"fuseflow_teacher_worker_tokens_total"})
        teacher_tok_s[name] = rates[name].update(now, None if got is None else got.get("fuseflow_teacher_worker_tokens_total", 0.0))
    got = scrape(f"http://127.0.0.1:{trainer_port}/metrics",
                 {"fuseflow_trainer_tokens_total", "fuseflow_trainer_step", TRAINER_WINDOW})
    trainer_tok_s = trainer_rate.update(now, None if got is None else got.get("fuseflow_trainer_tokens_total", 0.0))
    if stats is not None:
        # The window is the trainer's (online.window, or its default for the run), not this client's default.
        window = None if got is None else got.get(TRAINER_WINDOW)
        stats = {**stats, "window": None if not window else int(window)}
    return format_status(stats, teacher_tok_s, trainer_tok_s, None if got is None else got.get("fuseflow_trainer_step"))


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fuseflow stack",
        description="Run the online knowledge-fusion system on this machine as processes: a Redis server, one "
        "teacher service per source, the trainer. Ctrl-C stops it; running it again resumes the run.",
        epilog="example: fuseflow stack up examples/quickstart.yaml train.max_steps=20",
    )
    p.add_argument("action", choices=["up"], help="up: start the stack and wait for the trainer")
    p.add_argument("config", help="run config YAML (see examples/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=20")
    p.add_argument("--redis", default=os.environ.get("FUSEFLOW_REDIS_URL"),
                   help="use this Redis instead of starting one (default: env FUSEFLOW_REDIS_URL)")
    p.add_argument("--run", default=None, help="run name (default: env FUSEFLOW_RUN, else the run_dir name)")
    p.add_argument("--host", default="127.0.0.1", help="address the teachers' gRPC and every metrics port bind "
                   "(default 127.0.0.1: this machine only; 0.0.0.0 exposes them, token-protected gRPC)")
    p.add_argument("--teacher-port", type=int, default=StackPorts.teacher,
                   help="gRPC port of the first teacher; the others follow (default 50051)")
    p.add_argument("--teacher-metrics-port", type=int, default=StackPorts.teacher_metrics,
                   help="metrics port of the first teacher (default 9400)")
    p.add_argument("--trainer-metrics-port", type=int, default=StackPorts.trainer_metrics,
                   help="trainer metrics port (default 9401)")
    return p


def run(args: argparse.Namespace) -> int:
    cfg = load_config(FuseConfig, args.config, args.overrides)
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal %d: stopping the stack", signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ports = StackPorts(args.teacher_port, args.teacher_metrics_port, args.trainer_metrics_port)
        return run_stack(cfg, args.redis, args.run, ports, stop_event=stop, host=args.host)
    except RuntimeError as e:  # a teacher that keeps crashing, a Redis server that does not start
        print(f"fuseflow stack: error: {e}", file=sys.stderr)
        return 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
