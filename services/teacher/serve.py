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
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("fuseflow.teacher.serve")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(ValueError):
    """A flag combination or file that cannot work; the message says which flag to change."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fuseflow teacher serve",
        description="Serve one source LLM over gRPC (fuseflow.v1.TeacherService), optionally also as the Redis "
        "worker of a knowledge-fusion run.",
        epilog="example: fuseflow teacher serve --config examples/quickstart.yaml --source smollm --port 50051",
    )
    what = p.add_argument_group("model (one of)")
    what.add_argument("--config", metavar="RUN.yaml", help="run config; serve the source named by --source")
    what.add_argument("--source", metavar="NAME", help="name of a source in the config's `sources`")
    what.add_argument("--model", metavar="MODEL", help="serve a model standalone: short name, HF dir or .gguf file")
    what.add_argument("--engine", choices=["hf", "vllm"], default=None, help="engine for --model (default hf)")
    what.add_argument("--device", default=None, help="hf engine device (default: the config's, else cuda if available)")
    what.add_argument("--dtype", default=None, help="model dtype for --model (default: auto)")

    net = p.add_argument_group("network")
    net.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    net.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051; 0 = any free port)")
    net.add_argument("--metrics-port", type=int, default=9400, help="Prometheus /metrics port (default 9400; 0 = any)")
    net.add_argument("--tls-cert", metavar="F", help="PEM server certificate (chain); with --tls-key turns TLS on")
    net.add_argument("--tls-key", metavar="F", help="PEM private key of --tls-cert")
    net.add_argument("--token-file", metavar="F", help="file holding the bearer token clients must send "
                     "(default: env FUSEFLOW_TEACHER_TOKEN; neither: no auth)")

    work = p.add_argument_group("Redis worker")
    work.add_argument("--redis", metavar="URL", nargs="?", default=None, const=os.environ.get("FUSEFLOW_REDIS_URL", ""),
                      help="also be a worker of the run: take samples from its Redis stream, write aligned "
                      "distributions back (needs --config); --redis without URL uses env FUSEFLOW_REDIS_URL")
    work.add_argument("--run", metavar="RUN", default=None, help="run name (default: env FUSEFLOW_RUN, else the "
                      "config's run_dir name)")
    work.add_argument("--max-deliveries", type=int, default=5, help="dead-letter a sample taken over from dead "
                      "replicas more than this many times: a poison sample that kills the process (default 5)")

    lim = p.add_argument_group("limits")
    lim.add_argument("--max-texts", type=int, default=256, help="sequences per request (default 256)")
    lim.add_argument("--max-tokens", type=int, default=16384, help="tokens per request (default 16384)")
    lim.add_argument("--max-text-bytes", type=int, default=None, help="UTF-8 bytes of texts per request, refused "
                     "before tokenizing (default 16 per token of --max-tokens: 256 KiB); the gRPC receive limit "
                     "follows from this, --max-tokens and --max-texts")
    lim.add_argument("--max-concurrent-rpcs", type=int, default=32, help="TeacherService calls served at once; "
                     "more are answered RESOURCE_EXHAUSTED (default 32; health checks are not counted)")
    lim.add_argument("--max-tokenizing", type=int, default=2, help="texts requests tokenized at once; tokenizing "
                     "holds ~250 bytes of memory per text byte (default 2)")
    lim.add_argument("--max-top-k", type=int, default=64, help="largest top_k (default 64)")
    lim.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits to share a batch (default 5)")
    lim.add_argument("--grace-s", type=float, default=30.0, help="shutdown grace period for in-flight requests (default 30)")
    return p


@dataclass
class EngineSpec:
    """What to load, resolved from the flags and the run config."""

    name: str
    kind: str
    model: str
    options: dict = field(default_factory=dict)
    config: object | None = None  # fuseflow.config.FuseConfig with --config
    source: object | None = None  # its SourceConfig


def main(argv: Sequence[str] | None = None) -> int:
    """``fuseflow teacher serve …`` (also ``python -m fuseflow.teacher.serve``), through the one CLI wrapper (:mod:`fuseflow.cli`)."""
    from fuseflow.cli import run_command

    return run_command("teacher serve", sys.argv[1:] if argv is None else argv)


def run(args: argparse.Namespace) -> int:
    from fuseflow.teacher.server import ServerOptions, build_server

    spec = resolve_spec(args)
    if args.redis == "":
        raise UsageError("--redis without a URL needs env FUSEFLOW_REDIS_URL (e.g. redis://:PASSWORD@redis:6379/0)")
    if args.max_deliveries < 1:
        raise UsageError(f"--max-deliveries must be >= 1, got {args.max_deliveries}")
    options = ServerOptions(
        host=args.host,
        port=args.port,
        max_texts=args.max_texts,
        max_tokens=args.max_tokens,
        max_text_bytes=args.max_text_bytes,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_tokenizing=args.max_tokenizing,
        max_top_k=args.max_top_k,
        token=read_token(args.token_file),
        max_wait_ms=args.max_wait_ms,
        **read_tls(args.tls_cert, args.tls_key),
    )
    try:
        options.validate()
    except ValueError as e:
        raise UsageError(str(e).replace("server option ", "--").replace("_", "-")) from None
    run_worker = import_worker() if args.redis else None  # fail before loading a model for minutes

    from fuseflow.score.engine import create_engine
    from fuseflow.teacher.metrics import TeacherMetrics
    from fuseflow.teacher.request_batcher import RequestBatcher

    log.info("loading %s (%s engine) from %s", spec.name, spec.kind, spec.model)
    engine = create_engine(spec.kind, spec.model, **spec.options)
    metrics = TeacherMetrics()
    batcher = RequestBatcher(
        engine, options.max_batch_tokens, options.max_wait_ms, observer=metrics, max_tokenizing=options.max_tokenizing
    )
    try:
        server, port = build_server(batcher, options, metrics)
        metrics_port = metrics.start_http(args.metrics_port, args.host)
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
            spec.name, args.host, port, "TLS" if options.tls_cert else "plaintext",
            "bearer token" if options.token else "no auth", metrics_port,
            extra={"fields": {"port": port, "metrics_port": metrics_port, "model": spec.name}},
        )
        if run_worker is not None:
            worker = start_worker(run_worker, spec, batcher, metrics, args, stop)
        while not stop.wait(0.5):
            if worker is not None and not worker.is_alive():
                log.error("the Redis worker stopped; shutting the teacher down")
                stop.set()
                return_code = EXIT_FAILED
                break
        else:
            return_code = EXIT_OK
        log.info("draining: health NOT_SERVING, finishing in-flight requests (grace %.0f s)", args.grace_s)
        server.begin_drain()
        if worker is not None:
            worker.join(args.grace_s)
        server.stop(args.grace_s).wait(args.grace_s + 5)
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
    if bool(args.config) == bool(args.model):
        raise UsageError("give either --config RUN.yaml --source NAME or --model MODEL")
    if args.model:
        if args.source:
            raise UsageError("--source picks a source of --config; with --model, leave it out")
        if args.redis is not None:
            raise UsageError("--redis needs --config (the run's target, align and top_k); --model serves standalone")
        kind = args.engine or "hf"
        options = {"max_top_k": args.max_top_k}
        if args.dtype:
            options["dtype"] = args.dtype
        if kind == "hf":
            options["device"] = args.device or _default_device()
        return EngineSpec(name=args.model, kind=kind, model=args.model, options=options)

    from fuseflow.config import FuseConfig, load_config

    cfg = load_config(FuseConfig, args.config)
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
        raise UsageError(f"--engine {args.engine} contradicts sources[{source.key}].engine {source.engine} in {args.config}")
    # The source's engine as `fuseflow fuse` builds it (SourceConfig.engine_kwargs: its fields, then its
    # engine_options, which win over the server's max_top_k too).
    options = {"max_top_k": args.max_top_k, **source.engine_kwargs(args.device or cfg.device)}
    return EngineSpec(name=source.key, kind=source.engine, model=source.model, options=options, config=cfg, source=source)


def read_token(token_file: str | None) -> str | None:
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise UsageError(f"cannot read --token-file {token_file}: {e.strerror}") from None
        if not token:
            raise UsageError(f"--token-file {token_file} is empty")
        return token
    return os.environ.get("FUSEFLOW_TEACHER_TOKEN", "").strip() or None


def read_tls(cert: str | None, key: str | None) -> dict:
    if bool(cert) != bool(key):
        raise UsageError("TLS needs both --tls-cert and --tls-key")
    if not cert:
        return {}
    out = {}
    for flag, path, field_name in (("--tls-cert", cert, "tls_cert"), ("--tls-key", key, "tls_key")):
        try:
            out[field_name] = Path(path).read_bytes()
        except OSError as e:
            raise UsageError(f"cannot read {flag} {path}: {e.strerror}") from None
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


def start_worker(run_worker, spec: EngineSpec, batcher, metrics, args, stop: threading.Event) -> threading.Thread:
    """The run's teacher worker on a thread, scoring through ``batcher`` (shared with gRPC clients)."""
    from fuseflow.models import load_tokenizer
    from fuseflow.score.aligner import TeacherAligner
    from fuseflow.wire.redis_streams import RedisTransport

    cfg = spec.config
    run = cfg.run_name(args.run)
    aligner = TeacherAligner.for_run(cfg, spec.name, batcher, load_tokenizer(cfg.target.model))
    transport = RedisTransport(
        args.redis, run, teachers=[s.key for s in cfg.sources], max_deliveries=args.max_deliveries
    )
    consumer = f"{socket.gethostname()}-{os.getpid()}"

    def work() -> None:
        try:
            run_worker(aligner, transport, consumer, stop, metrics)
        except Exception:
            log.exception("the Redis worker failed")
        finally:
            transport.close()

    thread = threading.Thread(target=work, name="teacher-worker", daemon=True)
    thread.start()
    log.info("worker %s for run %r, teacher %r on %s", consumer, run, spec.name, _redact(args.redis))
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


if __name__ == "__main__":
    sys.exit(main())
