"""Merge time and peak memory of ``fuseflow merge`` on a ≥1B-parameter Llama-shaped model, and of mergekit
doing the same merge when it is importable.

The models are random: a base with Llama tensor names and shapes, and N "fine-tuned" copies (base plus small
seeded noise), written as bf16 safetensors shards one tensor at a time, so the bench itself never holds a
model. Each merge runs in a fresh subprocess; a thread samples its resident set (VmRSS, and RssAnon: the
part that is not file-backed page cache) every 50 ms. Inputs are read from the page cache once warm.

    python bench/merge.py                                        # TinyLlama-1.1B shapes, N=2, varm/sce/linear
    python bench/merge.py --shape llama-3.2-1b --models 3 --out merge.json
    python bench/merge.py --mergekit-path /tmp/mergekit-pkgs     # a `pip install --target` of mergekit

mergekit runs with ``dtype: float32, out_dtype: bfloat16`` (float32 arithmetic, as fuseflow) and its default
options; its ``linear`` gets the N models without the base (fuseflow's ``linear`` leaves the base out);
it has no ``varm``. The "max abs diff" column compares the two outputs: for ``sce`` they differ only where
entries tie in variance at the selection threshold (common with bf16 inputs) and the two tools keep
different ones (fuseflow.merge.methods.top_k_mask), and through those, slightly, in the weights.
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


def write_random_model(out: Path, spec: dict, variant: int | None, shard_bytes: int, noise: float = 2e-3) -> Path:
    """Base weights (``variant=None``) or base + ``noise``·N(0, 1) for fine-tuned copy ``variant``, in bf16
    shards, one tensor in memory at a time. Base tensors are regenerated from per-tensor seeds. A directory
    completed earlier with the same settings (``--workdir``) is reused."""
    stamp = json.dumps({"spec": spec, "variant": variant, "shard_bytes": shard_bytes, "noise": noise})
    if (out / ".bench-complete").exists() and (out / ".bench-complete").read_text() == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)
    tensors = llama_tensors(spec)
    shards: list[list[ShardEntry]] = [[]]
    filled = 0
    for name, shape in tensors:
        size = nbytes(shape, torch.bfloat16)
        if filled and filled + size > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(ShardEntry(name, shape, torch.bfloat16))
        filled += size
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for file, entries in zip(files, shards):
        writer = StreamingShardWriter(out / file, entries)
        for e in entries:
            seed = zlib.crc32(e.name.encode())
            w = _randn(e.shape, seed)
            w = w.mul_(0.02) if len(e.shape) > 1 else w.mul_(0.05).add_(1.0)  # norms start near 1
            if variant is not None:
                w.add_(_randn(e.shape, seed + 7919 * (variant + 1)), alpha=noise)
            writer.write(e.name, w.to(torch.bfloat16))
            weight_map[e.name] = file
        writer.close()
    if n > 1:
        write_index(out, weight_map, sum(nbytes(s, torch.bfloat16) for _, s in tensors))
    (out / "config.json").write_text(json.dumps(llama_config(spec), indent=2))
    (out / ".bench-complete").write_text(stamp)
    return out


def _tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """(VmRSS, RssAnon) in bytes summed over a process and its children."""
    rss = anon = 0
    for p in [proc, *proc.children(recursive=True)]:
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
    """Run ``cmd``; wall time and peak VmRSS / RssAnon sampled every 50 ms."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak = [0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss, anon = _tree_memory(ps)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], anon)
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
    return {
        "wall_s": wall,
        "peak_rss_bytes": peak[0],
        "peak_anon_bytes": peak[1],
        "loadavg_1min_after": os.getloadavg()[0],  # other work on the machine slows the merge
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


def mergekit_env(path: str | None) -> dict[str, str] | None:
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = os.pathsep.join([path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    probe = subprocess.run([sys.executable, "-c", "import mergekit"], env=env, capture_output=True)
    return env if probe.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b", help="Llama shapes to imitate")
    ap.add_argument("--models", type=int, default=2, help="N, the number of fine-tuned models merged")
    ap.add_argument("--methods", default="varm,sce,linear", help="comma-separated fuseflow methods")
    ap.add_argument("--select-topk", type=float, default=0.1, help="sce's τ (FuseChat-2.0: 0.1)")
    ap.add_argument("--input-shard-size", default="2GB", help="shard size of the generated models")
    ap.add_argument("--shard-size", default="5GB", help="fuseflow's output shard size")
    ap.add_argument("--threads", type=int, default=1, help="fuseflow's `threads` (torch intra-op threads)")
    ap.add_argument("--mergekit-path", help="directory to prepend to PYTHONPATH for mergekit (pip install --target)")
    ap.add_argument("--no-mergekit", action="store_true", help="skip the mergekit runs")
    ap.add_argument("--workdir", help="where to write the models (default: a temporary directory, removed after)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    from fuseflow.merge.config import parse_size

    spec = SHAPES[args.shape]
    tensors = llama_tensors(spec)
    params = sum(torch.Size(s).numel() for _, s in tensors)
    model_bytes = sum(nbytes(s, torch.bfloat16) for _, s in tensors)
    largest = max(nbytes(s, torch.bfloat16) for _, s in tensors)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fuseflow-bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    mk_env = None if args.no_mergekit else mergekit_env(args.mergekit_path)
    if not args.no_mergekit and mk_env is None:
        print("mergekit is not importable here: its rows are skipped "
              "(pip install --target DIR mergekit, then --mergekit-path DIR)")

    t0 = time.perf_counter()
    base = write_random_model(work / "base", spec, None, parse_size(args.input_shard_size))
    shard_bytes = parse_size(args.input_shard_size)
    models = [write_random_model(work / f"ft{j}", spec, j, shard_bytes) for j in range(args.models)]
    gen_s = time.perf_counter() - t0
    print(
        f"{args.shape}: {params / 1e9:.2f}B parameters, {model_bytes / 1e9:.2f} GB per bf16 model, largest tensor "
        f"{largest / 1e6:.0f} MB; base + {args.models} models written in {gen_s:.0f} s to {work}"
    )

    rows = []
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    try:
        for method in args.methods.split(","):
            parameters = {"select_topk": args.select_topk} if method == "sce" else {}
            ours_out = work / f"out-fuseflow-{method}"
            cfg = work / f"fuseflow-{method}.yaml"
            cfg.write_text(yaml.safe_dump({
                "method": method, "base": str(base), "models": [str(m) for m in models], "parameters": parameters,
                "output": str(ours_out), "dtype": "bfloat16", "shard_size": args.shard_size, "overwrite": True,
                "threads": args.threads,
            }))
            m = run_measured([sys.executable, "-m", "fuseflow.merge.run", str(cfg), "--no-progress"], env)
            rows.append({"method": method, "tool": "fuseflow", **m})
            print(f"  fuseflow {method}: {m['wall_s']:.1f} s, peak RSS {m['peak_rss_bytes'] / 1e9:.2f} GB")

            mk_method = {"sce": "sce", "linear": "linear"}.get(method)
            if mk_env is not None and mk_method is not None:
                mk_out = work / f"out-mergekit-{method}"
                shutil.rmtree(mk_out, ignore_errors=True)
                mk_cfg = work / f"mergekit-{method}.yaml"
                weight = {"parameters": {"weight": 1.0}} if method == "linear" else {}
                doc = {
                    "models": [{"model": str(p), **weight} for p in models],
                    "merge_method": mk_method,
                    "dtype": "float32",
                    "out_dtype": "bfloat16",
                }
                if method == "sce":
                    doc.update(base_model=str(base), parameters={"select_topk": args.select_topk})
                mk_cfg.write_text(yaml.safe_dump(doc))
                cmd = [sys.executable, "-m", "mergekit.scripts.run_yaml", str(mk_cfg), str(mk_out)]
                cmd += ["--quiet", "--no-copy-tokenizer", "--no-write-model-card"]
                mm = run_measured(cmd, {**mk_env, "TOKENIZERS_PARALLELISM": "false"})
                diff = max_abs_diff(ours_out, mk_out, [n for n, _ in tensors])
                rows.append({"method": method, "tool": "mergekit 0.1.5", **mm, "max_abs_diff_vs_fuseflow": diff})
                print(f"  mergekit {method}: {mm['wall_s']:.1f} s, peak RSS {mm['peak_rss_bytes'] / 1e9:.2f} GB, "
                      f"max |diff| {diff:.2e}")
                shutil.rmtree(mk_out, ignore_errors=True)
            shutil.rmtree(ours_out, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"Merge of N={args.models} {args.shape}-shaped models ({params / 1e9:.2f}B parameters, bf16, "
          f"{model_bytes / 1e9:.2f} GB each; largest tensor {largest / 1e6:.0f} MB; "
          f"(N+2) x largest = {(args.models + 2) * largest / 1e9:.2f} GB; "
          f"N+1 models = {(args.models + 1) * model_bytes / 1e9:.2f} GB)")
    print()
    print("| method | tool | wall s | peak RSS GB | peak anon GB | peak anon / largest tensor "
          "| max abs diff vs fuseflow | load avg |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        diff = f"{r['max_abs_diff_vs_fuseflow']:.1e}" if "max_abs_diff_vs_fuseflow" in r else ""
        print(f"| {r['method']} | {r['tool']} | {r['wall_s']:.1f} | {r['peak_rss_bytes'] / 1e9:.2f} | "
              f"{r['peak_anon_bytes'] / 1e9:.2f} | {r['peak_anon_bytes'] / largest:.1f} | {diff} "
              f"| {r['loadavg_1min_after']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "shape": args.shape, "spec": spec, "parameters": params, "models": args.models, "model_bytes": model_bytes,
            "largest_tensor_bytes": largest, "generate_s": gen_s, "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "rows": rows,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
