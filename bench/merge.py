"""Every merge method fuseflow shares with mergekit, run by both tools on the same mergekit YAML, in one run:
wall time, peak memory, and the largest difference between the two outputs.

Inputs (default): SmolLM2-135M (``smollm2-135m`` from fuseflow.models) written as a bf16 base and N
"fine-tuned" copies, base + σ·N(0, 1) with σ = 2e-4 (an update size like a real fine-tune's), one tensor
at a time. ``--shape`` instead writes random Llama-shaped models (e.g. TinyLlama-1.1B shapes) to see how
memory scales with the largest tensor.

Each method gets one mergekit YAML (``dtype: float32, out_dtype: bfloat16``: both compute in float32 and
write bf16). mergekit runs it with ``mergekit.scripts.run_yaml`` (``--num-threads`` = ``--threads``,
``--random-seed 0``); fuseflow runs the same file (``python -m fuseflow.cli merge FILE output=...
threads=...``). Each merge is a fresh subprocess: peak RSS is the kernel's (``ru_maxrss`` from ``wait4``;
it includes the pages of memory-mapped inputs), peak RssAnon (the part that is not file-backed) is
sampled every 20 ms. Inputs are read from the page cache once warm.

Columns: wall s, peak RSS / RssAnon GB, (peak RssAnon − the tool's idle RssAnon after its imports) over
the largest tensor (bf16 bytes) next to the bound N + 2, and ``max |Δ|`` = max over tensors and entries
of |fuseflow − mergekit| in the bf16 outputs, also divided by the largest update max |θ_j − θ_base| of the
inputs. Rows marked ``random`` drop entries at random: fuseflow's seeded generator and mergekit's global
one draw different masks, so their ``max |Δ|`` is not a comparison of the methods. The machine's 1-min
load average after each row is printed with it: on a shared machine, timings include waiting for a core.

sce: the ``sce`` row runs the mergekit YAML, which fuseflow reads with mergekit's equal-weight fallback
(``uniform_below: 1e-6``: equal weights when Σ_j mean(Δ_j²) < 1e-6), so that the same file gives the same
merge. ``sce (paper)`` is fuseflow's own config, whose weights follow the paper's formula at every update
size, against mergekit's sce on the same inputs: at small updates it measures how far the paper's
weights are from mergekit's equal ones. ``varm`` has no mergekit counterpart.

    nice -n 10 python bench/merge.py --mergekit-python /work/venvs/mergekit/bin/python --out merge.json
    python bench/merge.py --methods ties,sce --models 3
    python bench/merge.py --shape tinyllama-1.1b --methods linear,ties --no-mergekit
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import psutil
import torch
import yaml

from fuseflow.merge.safetensors_io import ShardEntry, StreamingShardWriter, TensorRef, load_tensor, nbytes, write_index

SHAPES = {
    # TinyLlama-1.1B: 1.10B parameters, untied head, largest tensor the 32000 x 2048 embedding.
    "tinyllama-1.1b": dict(vocab=32000, hidden=2048, layers=22, intermediate=5632, heads=32, kv_heads=4, tied=False),
    # Llama-3.2-1B: 1.24B parameters, tied head, largest tensor the 128256 x 2048 embedding.
    "llama-3.2-1b": dict(vocab=128256, hidden=2048, layers=16, intermediate=8192, heads=32, kv_heads=8, tied=True),
    # A few MB: checks the script itself in seconds.
    "smoke": dict(vocab=1000, hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, tied=False),
}


def llama_tensors(spec: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, kv = spec["hidden"], spec["hidden"] // spec["heads"] * spec["kv_heads"]
    out = [("model.embed_tokens.weight", (spec["vocab"], h))]
    for i in range(spec["layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (spec["intermediate"], h)),
            (p + "mlp.up_proj.weight", (spec["intermediate"], h)),
            (p + "mlp.down_proj.weight", (h, spec["intermediate"])),
        ]
    out.append(("model.norm.weight", (h,)))
    if not spec["tied"]:
        out.append(("lm_head.weight", (spec["vocab"], h)))
    return out


def llama_config(spec: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": spec["vocab"],
        "hidden_size": spec["hidden"],
        "intermediate_size": spec["intermediate"],
        "num_hidden_layers": spec["layers"],
        "num_attention_heads": spec["heads"],
        "num_key_value_heads": spec["kv_heads"],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": spec["tied"],
        "dtype": "bfloat16",
    }


def _randn(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # [*shape] float32


def _write_sharded(out: Path, entries: list[ShardEntry], tensor_of, shard_bytes: int) -> None:
    """Write ``entries`` (in order) as HF safetensors shards of at most ``shard_bytes`` (a larger tensor gets a
    shard of its own) plus the index when there are several; ``tensor_of(entry)`` makes one tensor at a time."""
    shards: list[list[ShardEntry]] = [[]]
    filled = 0
    for e in entries:
        size = nbytes(e.shape, e.dtype)
        if filled and filled + size > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(e)
        filled += size
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for file, chunk in zip(files, shards):
        writer = StreamingShardWriter(out / file, chunk)
        for e in chunk:
            writer.write(e.name, tensor_of(e))
            weight_map[e.name] = file
        writer.close()
    if n > 1:
        write_index(out, weight_map, sum(nbytes(e.shape, e.dtype) for e in entries))


def write_random_model(out: Path, spec: dict, variant: int | None, shard_bytes: int, noise: float = 2e-3) -> Path:
    """Base weights (``variant=None``) or base + ``noise``·N(0, 1) for fine-tuned copy ``variant``, in bf16
    shards, one tensor in memory at a time. Base tensors are regenerated from per-tensor seeds. A directory
    completed earlier with the same settings (``--workdir``) is reused."""
    stamp = json.dumps({"spec": spec, "variant": variant, "shard_bytes": shard_bytes, "noise": noise})
    if (out / ".bench-complete").exists() and (out / ".bench-complete").read_text() == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)

    def tensor_of(e: ShardEntry) -> torch.Tensor:
        seed = zlib.crc32(e.name.encode())
        w = _randn(e.shape, seed)
        w = w.mul_(0.02) if len(e.shape) > 1 else w.mul_(0.05).add_(1.0)  # norms start near 1
        if variant is not None:
            w.add_(_randn(e.shape, seed + 7919 * (variant + 1)), alpha=noise)
        return w.to(torch.bfloat16)

    entries = [ShardEntry(name, shape, torch.bfloat16) for name, shape in llama_tensors(spec)]
    _write_sharded(out, entries, tensor_of, shard_bytes)
    (out / "config.json").write_text(json.dumps(llama_config(spec), indent=2))
    (out / ".bench-complete").write_text(stamp)
    return out


def _tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """(VmRSS, RssAnon) in bytes summed over a process and its children."""
    rss = anon = 0
    try:
        tree = [proc, *proc.children(recursive=True)]
    except psutil.Error:  # exited between two samples
        return 0, 0
    for p in tree:
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon += int(line.split()[1]) * 1024
        except (FileNotFoundError, ProcessLookupError):
            pass
    return rss, anon


def run_measured(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd``: wall time, its peak resident set from the kernel (``ru_maxrss`` of ``wait4``: exact,
    includes the file-backed pages of memory-mapped inputs) and its peak RssAnon (sampled every 20 ms, so a
    peak shorter than that can be missed)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        ps = psutil.Process(proc.pid)
        peak = [0, 0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                rss, anon = _tree_memory(ps)
                peak[0], peak[1] = max(peak[0], rss), max(peak[1], anon)
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        log.seek(0)
        output = log.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
    return {
        "wall_s": wall,
        "peak_rss_bytes": max(usage.ru_maxrss * 1024, peak[0]),  # ru_maxrss: KiB on Linux
        "peak_anon_bytes": peak[1],
        "loadavg_1min_after": os.getloadavg()[0],  # other work on the machine slows the merge
    }


# What each tool's interpreter holds before it merges anything: its imports (torch, and transformers for
# mergekit). Measured once per run; the table subtracts it from the peak RssAnon.
IDLE_IMPORTS = {
    "fuseflow": "import torch, fuseflow.merge.run, fuseflow.merge.execute",
    "mergekit": "import torch, mergekit.merge, mergekit.scripts.run_yaml",
}


def max_abs_diff(a_dir: Path, b_dir: Path, names: list[str]) -> float:
    def where(d: Path) -> dict[str, Path]:
        index = d / "model.safetensors.index.json"
        if index.exists():
            return {k: d / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        return {n: d / "model.safetensors" for n in names}

    fa, fb = where(a_dir), where(b_dir)
    worst = 0.0
    for n in names:
        a, b = load_tensor(TensorRef(fa[n], n)), load_tensor(TensorRef(fb[n], n))
        worst = max(worst, (a.float() - b.float()).abs().max().item())
    return worst


def write_copy_of(src: Path, out: Path, variant: int | None, shard_bytes: int, noise: float) -> Path:
    """A bf16 copy of the HF model ``src`` (``variant=None``) or that copy + ``noise``·N(0, 1) for fine-tuned
    copy ``variant`` (seeded per tensor), with ``src``'s config and tokenizer files; one tensor in memory at
    a time. Reused when complete with the same settings."""
    stamp = json.dumps({"src": str(src), "variant": variant, "shard_bytes": shard_bytes, "noise": noise})
    if (out / ".bench-complete").exists() and (out / ".bench-complete").read_text() == stamp:
        return out
    from fuseflow.merge.plan import inspect_model

    info = inspect_model(src)
    out.mkdir(parents=True, exist_ok=True)

    def tensor_of(e: ShardEntry) -> torch.Tensor:
        w = load_tensor(TensorRef(info.tensors[e.name].file, e.name))
        if e.dtype == torch.bfloat16:
            w = w.float()
            if variant is not None:
                w = w + noise * _randn(tuple(e.shape), zlib.crc32(e.name.encode()) + 7919 * (variant + 1))
        return w.to(e.dtype)

    entries = []
    for name in sorted(info.tensors):
        meta = info.tensors[name]
        entries.append(ShardEntry(name, meta.shape, torch.bfloat16 if meta.dtype.is_floating_point else meta.dtype))
    _write_sharded(out, entries, tensor_of, shard_bytes)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and not f.name.endswith(".index.json") and f.name != "fuseflow_source.json":
            shutil.copy2(f, out / f.name)
    cfg = json.loads((out / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    cfg.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / ".bench-complete").write_text(stamp)
    return out


def largest_update(base: Path, models: list[Path], names: list[str]) -> float:
    """max over tensors, models and entries of |θ_j − θ_base| (the scale ``max |Δ|`` is compared with)."""
    worst = 0.0
    for n in names:
        b = load_tensor(TensorRef(_where(base, names)[n], n)).float()
        for m in models:
            worst = max(worst, (load_tensor(TensorRef(_where(m, names)[n], n)).float() - b).abs().max().item())
    return worst


def _where(d: Path, names: list[str]) -> dict[str, Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        return {k: d / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    return {n: d / "model.safetensors" for n in names}


def mergekit_ok(python: str) -> bool:
    return subprocess.run([python, "-c", "import mergekit"], capture_output=True).returncode == 0


def mergekit_version(python: str) -> str:
    probe = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                           capture_output=True, text=True)
    return probe.stdout.strip() or "?"


# The shared methods: mergekit YAML for (base, models, layers). Parameters are mergekit's names; where a
# method has a sparsity knob it is set to a typical value rather than mergekit's no-op default of 1.0.
def _models(models: list[Path], **params) -> list[dict]:
    return [{"model": str(m), **({"parameters": params} if params else {})} for m in models]


METHODS = {
    "linear": lambda b, ms, L: {"models": _models(ms, weight=1.0)},
    "task_arithmetic": lambda b, ms, L: {"base_model": str(b), "models": _models(ms, weight=1.0)},
    "ties": lambda b, ms, L: {"base_model": str(b), "models": _models(ms, weight=1.0, density=0.5)},
    "dare_linear": lambda b, ms, L: {"base_model": str(b), "models": _models(ms, weight=1.0, density=0.5)},
    "dare_ties": lambda b, ms, L: {"base_model": str(b), "models": _models(ms, weight=1.0, density=0.5)},
    "breadcrumbs": lambda b, ms, L: {"base_model": str(b), "models": _models(ms, weight=1.0, density=0.9, gamma=0.01)},
    "breadcrumbs_ties": lambda b, ms, L: {"base_model": str(b), "models": _models(ms, weight=1.0, density=0.9, gamma=0.01)},
    "della": lambda b, ms, L: {"base_model": str(b), "models": _models(ms, weight=1.0, density=0.5, epsilon=0.1)},
    "della_linear": lambda b, ms, L: {"base_model": str(b), "models": _models(ms, weight=1.0, density=0.5, epsilon=0.1)},
    "sce": lambda b, ms, L: {"base_model": str(b), "models": _models(ms), "parameters": {"select_topk": 0.1}},
    "slerp": lambda b, ms, L: {"base_model": str(b), "models": _models([b, ms[0]]), "parameters": {"t": 0.5}},
    "nuslerp": lambda b, ms, L: {"base_model": str(b), "models": _models(ms[:2], weight=1.0)},
    "multislerp": lambda b, ms, L: {"base_model": str(b), "models": _models(ms, weight=1.0)},
    "model_stock": lambda b, ms, L: {"base_model": str(b), "models": _models(ms)},
    "passthrough": lambda b, ms, L: {"slices": [
        {"sources": [{"model": str(b), "layer_range": [0, L * 2 // 3]}]},
        {"sources": [{"model": str(ms[0]), "layer_range": [L // 3, L]}]},
    ]},
}
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}
FUSEFLOW_ONLY = {"varm": {}, "sce (paper)": {"select_topk": 0.1}}
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-model", default="smollm2-135m", help="HF dir or fuseflow short name copied as the base")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="random Llama-shaped models instead of --base-model")
    ap.add_argument("--noise", type=float, help="σ of the fine-tuned copies' updates (default 2e-4; 2e-3 with --shape)")
    ap.add_argument("--models", type=int, default=2, help="N, the number of fine-tuned copies merged")
    ap.add_argument("--methods", default=",".join([*METHODS, *FUSEFLOW_ONLY]),
                    help="comma-separated: mergekit method names, plus 'varm' and 'sce (paper)' (fuseflow only)")
    ap.add_argument("--input-shard-size", default="2GB", help="shard size of the generated models")
    ap.add_argument("--shard-size", default="5GB", help="output shard size (both tools)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of both tools")
    ap.add_argument("--mergekit-python", default=os.environ.get("FUSEFLOW_MERGEKIT_PYTHON", sys.executable),
                    help="a Python that can import mergekit (default: $FUSEFLOW_MERGEKIT_PYTHON, else this one)")
    ap.add_argument("--no-mergekit", action="store_true", help="skip the mergekit runs")
    ap.add_argument("--workdir", help="where to write the models (default: a temporary directory, removed after)")
    ap.add_argument("--out", help="write the results as JSON here (after every row)")
    ap.add_argument("--table", metavar="JSON", help="print the table of an earlier run's JSON and exit")
    args = ap.parse_args(argv)
    if args.table:
        print_table(json.loads(Path(args.table).read_text()))
        return 0

    from fuseflow.merge.config import parse_size
    from fuseflow.models import resolve

    work = Path(args.workdir or tempfile.mkdtemp(prefix="fuseflow-bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    use_mk = not args.no_mergekit and mergekit_ok(args.mergekit_python)
    mk_version = mergekit_version(args.mergekit_python) if use_mk else None
    if not args.no_mergekit and not use_mk:
        print(f"mergekit is not importable by {args.mergekit_python}: its rows are skipped "
              "(python -m venv DIR && DIR/bin/pip install torch==2.13.0 mergekit==0.1.5; --mergekit-python DIR/bin/python)")

    shard_bytes = parse_size(args.input_shard_size)
    t0 = time.perf_counter()
    if args.shape:
        spec = SHAPES[args.shape]
        noise = args.noise if args.noise is not None else 2e-3
        base = write_random_model(work / "base", spec, None, shard_bytes)
        models = [write_random_model(work / f"ft{j}", spec, j, shard_bytes, noise) for j in range(args.models)]
        source, layers = f"random {args.shape}-shaped", spec["layers"]
    else:
        noise = args.noise if args.noise is not None else 2e-4
        src = resolve(args.base_model)
        base = write_copy_of(src, work / "base", None, shard_bytes, noise)
        models = [write_copy_of(src, work / f"ft{j}", j, shard_bytes, noise) for j in range(args.models)]
        source, layers = f"{args.base_model} (bf16 copy)", json.loads((base / "config.json").read_text())["num_hidden_layers"]
    from fuseflow.merge.plan import inspect_model

    info = inspect_model(base)
    names = sorted(info.tensors)
    params = sum(torch.Size(m.shape).numel() for m in info.tensors.values())
    model_bytes = sum(nbytes(m.shape, m.dtype) for m in info.tensors.values())
    largest = max(nbytes(m.shape, m.dtype) for m in info.tensors.values())
    gen_s = time.perf_counter() - t0
    max_update = largest_update(base, models, names)
    print(f"{source}: {params / 1e6:.0f}M parameters, {model_bytes / 1e9:.2f} GB per model, largest tensor "
          f"{largest / 1e6:.0f} MB; base + {args.models} copies (σ {noise:g}, max |θ_j − θ_base| {max_update:.2e}) "
          f"written in {gen_s:.0f} s to {work}")

    rows: list[dict] = []
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    n = args.models
    meta = {
        "source": source, "parameters": params, "models": n, "noise": noise, "max_update": max_update,
        "model_bytes": model_bytes, "largest_tensor_bytes": largest, "generate_s": gen_s,
        "threads": args.threads, "mergekit": mk_version, "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "command": " ".join(sys.argv), "rows": rows,
    }

    idle = {"fuseflow": run_measured([sys.executable, "-c", IDLE_IMPORTS["fuseflow"]], env)["peak_anon_bytes"]}
    if use_mk:
        idle["mergekit"] = run_measured([args.mergekit_python, "-c", IDLE_IMPORTS["mergekit"]],
                                        {**env, "PYTHONPATH": ""})["peak_anon_bytes"]
    meta["idle_anon_bytes"] = idle
    print("idle RssAnon after imports: " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in idle.items()))

    def save() -> None:  # after every row: a long run interrupted keeps what it measured
        if args.out:
            Path(args.out).write_text(json.dumps(meta, indent=2))

    outputs: dict[str, Path] = {}
    try:
        for method in args.methods.split(","):
            fuseflow_only = method in FUSEFLOW_ONLY
            if not fuseflow_only and method not in METHODS:
                raise SystemExit(f"--methods: unknown {method!r}; choose from {', '.join([*METHODS, *FUSEFLOW_ONLY])}")
            slug = method.replace(" ", "-").strip("()").replace("(", "").replace(")", "")
            ours_out = work / f"out-fuseflow-{slug}"
            cfg = work / f"{slug}.yml"
            if fuseflow_only:
                cfg.write_text(yaml.safe_dump({
                    "method": method.split(" ")[0], "base": str(base), "models": [str(m) for m in models],
                    "parameters": FUSEFLOW_ONLY[method], "output": str(ours_out), "dtype": "bfloat16",
                    "shard_size": args.shard_size, "overwrite": True, "threads": args.threads,
                }))
                cmd = [sys.executable, "-m", "fuseflow.cli", "merge", str(cfg), "--no-progress"]
            else:
                doc = {"merge_method": method, **METHODS[method](base, models, layers),
                       "dtype": "float32", "out_dtype": "bfloat16"}
                cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
                cmd = [sys.executable, "-m", "fuseflow.cli", "merge", str(cfg), f"output={ours_out}", "overwrite=true",
                       f"threads={args.threads}", f"shard_size={args.shard_size}", "--no-progress"]
            m = run_measured(cmd, env)
            rows.append({"method": method, "tool": "fuseflow", **m})
            save()
            print(f"  fuseflow {method}: {m['wall_s']:.1f} s, peak RSS {m['peak_rss_bytes'] / 1e9:.2f} GB")

            mk_method = "sce" if method == "sce (paper)" else None if fuseflow_only else method
            if use_mk and mk_method is not None:
                mk_out = outputs.get(mk_method)
                if mk_out is None:
                    mk_out = work / f"out-mergekit-{mk_method}"
                    shutil.rmtree(mk_out, ignore_errors=True)
                    mk_cfg = work / f"mergekit-{mk_method}.yml"
                    mk_cfg.write_text(yaml.safe_dump({"merge_method": mk_method, **METHODS[mk_method](base, models, layers),
                                                      "dtype": "float32", "out_dtype": "bfloat16"}, sort_keys=False))
                    mk_cmd = [args.mergekit_python, "-m", "mergekit.scripts.run_yaml", str(mk_cfg), str(mk_out),
                              "--no-copy-tokenizer", "--no-write-model-card", "--quiet",
                              "--num-threads", str(args.threads), "--random-seed", "0"]
                    mm = run_measured(mk_cmd, {**env, "PYTHONPATH": ""})
                    rows.append({"method": mk_method, "tool": f"mergekit {mk_version}", **mm})
                    save()
                    print(f"  mergekit {mk_method}: {mm['wall_s']:.1f} s, peak RSS {mm['peak_rss_bytes'] / 1e9:.2f} GB")
                    outputs[mk_method] = mk_out
                out_names = sorted(json.loads((ours_out / "model.safetensors.index.json").read_text())["weight_map"]) \
                    if (ours_out / "model.safetensors.index.json").exists() else sorted(
                        load_header_names(ours_out / "model.safetensors"))
                diff = max_abs_diff(ours_out, mk_out, out_names)
                target = next(r for r in reversed(rows) if r["tool"] == "fuseflow" and r["method"] == method)
                target["max_abs_diff_vs_mergekit"] = diff
                target["max_abs_diff_over_max_update"] = diff / max_update if max_update else None
                save()
                print(f"    max |fuseflow − mergekit| {diff:.2e} ({diff / max_update:.1%} of the largest update)")
            shutil.rmtree(ours_out, ignore_errors=True)
    finally:
        for p in outputs.values():
            shutil.rmtree(p, ignore_errors=True)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    print_table(meta)
    return 0


def print_table(meta: dict) -> None:
    """The markdown table of a run (``meta``: the JSON written with ``--out``)."""
    n, largest = meta["models"], meta["largest_tensor_bytes"]
    idle = meta.get("idle_anon_bytes", {})
    print()
    print(f"Merges of N={n} copies of {meta['source']} ({meta['parameters'] / 1e6:.0f}M parameters, bf16, "
          f"{meta['model_bytes'] / 1e9:.2f} GB each; updates σ {meta['noise']:g}, largest {meta['max_update']:.2e}; "
          f"largest tensor {largest / 1e6:.0f} MB; {meta['threads']} torch thread(s) each; idle RssAnon after "
          "imports " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in idle.items()) + "; 1-min load average after each row)")
    print()
    print("| method | tool | wall s | peak RSS GB | peak anon GB | (peak anon − idle) / largest tensor (bound) "
          "| max abs diff vs mergekit | … / largest update | load avg |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in meta["rows"]:
        diff = f"{r['max_abs_diff_vs_mergekit']:.1e}" if "max_abs_diff_vs_mergekit" in r else ""
        rel = f"{r['max_abs_diff_over_max_update']:.1%}" if r.get("max_abs_diff_over_max_update") is not None else ""
        if r["method"] in RANDOM and diff:
            diff, rel = diff + " (random)", rel + " (random)"
        inputs = {"slerp": 1, "nuslerp": 2, "passthrough": 1}.get(r["method"], n)
        base = idle.get(r["tool"].split()[0])
        units = f"{(r['peak_anon_bytes'] - base) / largest:.1f}" if base is not None else "?"
        print(f"| {r['method']} | {r['tool']} | {r['wall_s']:.1f} | {r['peak_rss_bytes'] / 1e9:.2f} | "
              f"{r['peak_anon_bytes'] / 1e9:.2f} | {units} ({inputs + 2}) | {diff} | {rel} "
              f"| {r['loadavg_1min_after']:.1f} |")


def load_header_names(file: Path) -> list[str]:
    from fuseflow.merge.safetensors_io import read_header

    return list(read_header(file))


if __name__ == "__main__":
    sys.exit(main())
