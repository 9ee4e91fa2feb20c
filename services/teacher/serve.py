"""``fuseflow teacher serve``: one source LLM behind gRPC, and optionally a Redis worker of a run.

    fuseflow teacher serve --model smollm2-135m --port 50051
    fuseflow teacher serve --config run.yaml --source gemma --redis redis://:pw@redis:6379/0 --run quickstart

The process: load the engine, start the request batcher (the one thread that runs the model), the gRPC
server, the Prometheus endpoint and, with ``--redis``, the worker that takes the run's work stream and
writes aligned distributions back (``fuseflow.teacher.worker.run_worker``), sharing the batcher with the
gRPC clients. SIGTERM or SIGINT drains: health NOT_SERVING, the worker stops taking work, in-flight
requests finish within ``--grace-s``, then the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from fuseflow.config import ConfigError, FuseConfig, ServeConfig, SourceConfig, flag_values, load_config
from fuseflow.score.engine import ModelSource, engine_from_source, source_engine_kwargs

log = logging.getLogger("fuseflow.teacher.serve")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(ValueError):
    """A flag combination or file that cannot work; the message says which flag to change."""


def build_parser() -> argparse.ArgumentParser:
    from fuseflow.config import OnlineConfig, ServeConfig, add_field_flags

    p = argparse.ArgumentParser(
        prog="fuseflow teacher serve",
        description="Serve one source LLM over gRPC (fuseflow.v1.TeacherService), optionally also as the Redis "
        "worker of a knowledge-fusion run. Its settings are the run config's `serve` and `online` sections: each "
        "flag below sets the field in brackets, as does a key=value override (serve.max_texts=128).",
        epilog="example: fuseflow teacher serve --config examples/quickstart.yaml --source smollm --port 50051",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides of the run config (or, with --model, of its "
                   "serve section), e.g. serve.max_tokens=8192")
    what = p.add_argument_group("model (one of)")
    what.add_argument("--config", metavar="RUN.yaml", help="run config; serve the source named by --source")
    what.add_argument("--source", metavar="NAME", help="name of a source in the config's `sources`")
    what.add_argument("--model", metavar="MODEL", help="serve a model standalone: short name, HF dir or .gguf file")
    what.add_argument("--engine", choices=["hf", "vllm"], default=None,
                      help="engine for --model (default hf); with --config, serve the source on this engine instead "
                      "of its own [sources[NAME].engine]")
    what.add_argument("--device", default=None, help="hf engine device (default: the config's, else cuda if available)")
    what.add_argument("--dtype", default=None, help="model dtype for --model (default: auto)")

    add_field_flags(p.add_argument_group("network"), ServeConfig, "serve",
                    ["host", "port", "metrics_port", "tls_cert", "tls_key", "token_file"])
    work = p.add_argument_group("Redis worker")
    work.add_argument("--redis", metavar="URL", nargs="?", default=None, const="",
                      help="also be a worker of the run (serve.worker; needs --config): take samples from its Redis "
                      "stream, write aligned distributions back; the URL sets online.redis, a bare --redis uses "
                      "online.redis or env FUSEFLOW_REDIS_URL")
    add_field_flags(work, OnlineConfig, "online", ["run", "max_deliveries", "reclaim_idle_s"])
    add_field_flags(p.add_argument_group("limits"), ServeConfig, "serve",
                    ["max_texts", "max_tokens", "max_text_bytes", "max_concurrent_rpcs", "max_tokenizing", "max_top_k",
                     "max_wait_ms", "grace_s"])
    return p


class StandaloneConfig(BaseModel):
    """``fuseflow teacher serve --model M``: no run config, only its ``serve`` section."""

    model_config = ConfigDict(extra="forbid")
    serve: ServeConfig = ServeConfig()


@dataclass
class EngineSpec:
    """What to load, resolved from the flags and the run config: ``source`` (a run config's source, or the
    ``--model`` served on its own) built by :func:`fuseflow.score.engine.engine_from_source` on ``device`` with
    the serve section's defaults, the one construction ``fuseflow fuse`` and the ensemble use too."""

    source: SourceConfig | ModelSource
    device: str | None = None
    serve: ServeConfig = field(default_factory=ServeConfig)
    config: FuseConfig | None = None  # with --config
    name: str = field(init=False)  # the teacher's name in logs and on the wire
    kind: str = field(init=False)
    model: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.source.key if isinstance(self.source, SourceConfig) else self.source.model
        self.kind, self.model = self.source.engine, self.source.model

    @property
    def options(self) -> dict:
        """The engine's keyword arguments, by the one precedence (:func:`~fuseflow.score.engine.source_engine_kwargs`)."""
        return source_engine_kwargs(self.source, self.device, self.serve.engine_defaults())

    def build_engine(self):
        return engine_from_source(self.source, self.device, self.serve.engine_defaults())


def run(args: argparse.Namespace) -> int:
    from fuseflow.teacher.server import build_server

    spec = resolve_spec(args)
    serve = spec.serve
    options = server_options(serve)
    run_worker = import_worker() if serve.worker else None  # fail before loading a model for minutes

    from fuseflow.teacher.metrics import TeacherMetrics
    from fuseflow.teacher.request_batcher import RequestBatcher

    log.info("loading %s (%s engine) from %s", spec.name, spec.kind, spec.model)
    engine = spec.build_engine()
    metrics = TeacherMetrics()
    batcher = RequestBatcher(
        engine, options.max_batch_tokens, options.max_wait_ms, observer=metrics, max_tokenizing=options.max_tokenizing
    )
    try:
        server, port = build_server(batcher, options, metrics)
        metrics_port = metrics.start_http(serve.metrics_port, serve.host)
    except BaseException:
        batcher.close(cancel_pending=True)
        raise
    stop = threading.Event()
    previous = _install_signal_handlers(stop)
    worker = None
    try:
        server.start()
        log.info(
            "serving %s on %s:%d (%s, %s) metrics on :%d",
            spec.name, serve.host, port, "TLS" if options.tls_cert else "plaintext",
            "bearer token" if options.token else "no auth", metrics_port,
            extra={"fields": {"port": port, "metrics_port": metrics_port, "model": spec.name}},
        )
        if run_worker is not None:
            worker = start_worker(run_worker, spec, batcher, metrics, stop)
        while not stop.wait(0.5):
            if worker is not None and not worker.is_alive():
                log.error("the Redis worker stopped; shutting the teacher down")
                stop.set()
                return_code = EXIT_FAILED
                break
        else:
            return_code = EXIT_OK
        log.info("draining: health NOT_SERVING, finishing in-flight requests (grace %.0f s)", serve.grace_s)
        server.begin_drain()
        if worker is not None:
            worker.join(serve.grace_s)
        server.stop(serve.grace_s).wait(serve.grace_s + 5)
        return return_code
    finally:
        stop.set()
        metrics.stop_http()
        server.stop(0)
        batcher.close(timeout=5, cancel_pending=True)
        _restore_signal_handlers(previous)
        log.info("teacher stopped")


# ----------------------------------------------------------------------------------------------------------
# Flags → what to serve.
# ----------------------------------------------------------------------------------------------------------


def resolve_spec(args: argparse.Namespace) -> EngineSpec:
    """What to serve and how: the flags (aliases of the ``serve`` and ``online`` fields) and ``key=value``
    overrides applied to the run config (``--config``) or, standalone (``--model``), to a ``serve`` section."""
    if bool(args.config) == bool(args.model):
        raise UsageError("give either --config RUN.yaml --source NAME or --model MODEL")
    flags = flag_values(args)
    if args.redis is not None:  # --redis [URL]: be the run's worker, at URL or online.redis / env
        flags["serve.worker"] = ("--redis", True)
        if args.redis:
            flags["online.redis"] = ("--redis", args.redis)
    if args.model:
        if args.source:
            raise UsageError("--source picks a source of --config; with --model, leave it out")
        if args.redis is not None:
            raise UsageError("--redis needs --config (the run's target, align and top_k); --model serves standalone")
        serve = load_config(StandaloneConfig, None, args.overrides, flags).serve
        if serve.worker:
            raise UsageError("serve.worker needs --config (the run's target, align and top_k); --model serves standalone")
        kind = args.engine or "hf"
        source = ModelSource(args.model, kind, {"dtype": args.dtype} if args.dtype else {})
        return EngineSpec(source, device=args.device or _default_device(), serve=serve)

    cfg = load_config(FuseConfig, args.config, args.overrides, flags)
    names = [s.key for s in cfg.sources]
    if args.source is None:
        if len(names) != 1:
            raise UsageError(f"--source is required: {args.config} has sources {names}")
        source = cfg.sources[0]
    else:
        matches = [s for s in cfg.sources if s.key == args.source]
        if not matches:
            raise UsageError(f"--source {args.source!r} is not in {args.config}; its sources are {names}")
        source = matches[0]
    if args.engine and args.engine != source.engine:
        # Set as the override sources.<i>.engine, so that the source's engine_options are checked against
        # that engine's options at config load, as for an engine written in the file.
        i = cfg.sources.index(source)
        try:
            cfg = load_config(FuseConfig, args.config, [*args.overrides, f"sources.{i}.engine={args.engine}"], flags)
        except ConfigError as e:
            raise UsageError(f"--engine {args.engine}: {e}") from None
        source = cfg.sources[i]
    if cfg.serve.worker and not cfg.online.redis_url():
        raise UsageError("serve.worker (--redis) needs a Redis URL: --redis URL, online.redis, or env FUSEFLOW_REDIS_URL "
                         "(e.g. redis://:PASSWORD@redis:6379/0)")
    return EngineSpec(source, device=args.device or cfg.device, serve=cfg.serve, config=cfg)


# ServeConfig fields that are the process's, not the gRPC server's: read here (token_file, tls_* as bytes) or
# used by `run` (metrics, the worker, the drain). Every other field is a ServerOptions field of the same name.
PROCESS_FIELDS = frozenset({"metrics_port", "token_file", "tls_cert", "tls_key", "worker", "grace_s"})


def server_options(serve: ServeConfig):
    """The gRPC server's options from the ``serve`` section: every field they share by name, the token and the
    TLS files read (issue 25: derived, not copied field by field). A limit the server rejects is named as the
    section's field (``serve.max_texts``)."""
    from fuseflow.teacher.server import ServerOptions

    shared = {name: getattr(serve, name) for name in ServeConfig.model_fields if name not in PROCESS_FIELDS}
    options = ServerOptions(**shared, token=read_token(serve.token_file), **read_tls(serve.tls_cert, serve.tls_key))
    try:
        options.validate()
    except ValueError as e:
        raise UsageError(str(e).replace("server option ", "serve.")) from None
    return options


def read_token(token_file: Path | None) -> str | None:
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise UsageError(f"cannot read serve.token_file (--token-file) {token_file}: {e.strerror}") from None
        if not token:
            raise UsageError(f"serve.token_file (--token-file) {token_file} is empty")
        return token
    return os.environ.get("FUSEFLOW_TEACHER_TOKEN", "").strip() or None


def read_tls(cert: Path | None, key: Path | None) -> dict:
    if not cert or not key:  # ServeConfig checks that both or neither are given
        return {}
    out = {}
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            out[name] = Path(path).read_bytes()
        except OSError as e:
            raise UsageError(f"cannot read serve.{name} (--{name.replace('_', '-')}) {path}: {e.strerror}") from None
    return out


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------------------
# The Redis worker.
# ----------------------------------------------------------------------------------------------------------


def import_worker():
    try:
        from fuseflow.teacher.worker import run_worker
    except ImportError as e:
        if e.name not in ("fuseflow.teacher.worker",):
            raise
        raise UsageError(
            "--redis needs the teacher worker (fuseflow.teacher.worker), which this installation lacks; "
            "serve without --redis or update fuseflow"
        ) from None
    return run_worker


def start_worker(run_worker, spec: EngineSpec, batcher, metrics, stop: threading.Event) -> threading.Thread:
    """The run's teacher worker on a thread, scoring through ``batcher`` (shared with gRPC clients)."""
    from fuseflow.models import load_tokenizer
    from fuseflow.score.aligner import TeacherAligner
    from fuseflow.wire.redis_streams import RedisTransport

    cfg = spec.config
    run = cfg.run_name()
    url = cfg.online.redis_url()
    aligner = TeacherAligner.for_run(cfg, spec.name, batcher, load_tokenizer(cfg.target.model))
    transport = RedisTransport(url, run, teachers=[s.key for s in cfg.sources], max_deliveries=cfg.online.max_deliveries)
    consumer = f"{socket.gethostname()}-{os.getpid()}"

    def work() -> None:
        try:
            run_worker(aligner, transport, consumer, stop, metrics,
                       reclaim_idle_ms=int(cfg.online.reclaim_idle_s * 1000))
        except Exception:
            log.exception("the Redis worker failed")
        finally:
            transport.close()

    thread = threading.Thread(target=work, name="teacher-worker", daemon=True)
    thread.start()
    log.info("worker %s for run %r, teacher %r on %s", consumer, run, spec.name, _redact(url))
    return thread


def _redact(url: str) -> str:
    """A Redis URL without its password, for logs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


# ----------------------------------------------------------------------------------------------------------
# Signals.
# ----------------------------------------------------------------------------------------------------------


def _install_signal_handlers(stop: threading.Event) -> dict:
    """SIGTERM/SIGINT set ``stop`` (drain); a second one exits at once. Only possible on the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handle(signum, frame):
        if stop.is_set():
            log.warning("second %s: exiting without draining", signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("%s received", signal.Signals(signum).name)
        stop.set()

    return {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore_signal_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
