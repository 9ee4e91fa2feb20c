"""``fuseflow query``: ask a served teacher what it is, how it tokenizes, how it scores, what it generates.

    fuseflow query --address localhost:50051 info
    fuseflow query --address localhost:50051 score "def f(x): return x" --top-k 5
    fuseflow query --address localhost:50051 score "def f(x):" --top-k 5 --json | jq .positions[0]
    fuseflow query --address teacher:50051 --tls-ca ca.pem --token "$TOKEN" generate "Once upon" --max-new-tokens 20

Prints a readable table by default and JSON with ``--json``. Exit status 0 on success, 1 when the teacher is
unreachable or answers with an error (one line on stderr, no traceback), 2 for a command-line mistake.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from fuseflow.wire.client import TeacherClient, TeacherError, TeacherInfo, TeacherRequestError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fuseflow query",
        description="Query a served teacher (fuseflow teacher serve) over gRPC.",
        epilog='example: fuseflow query --address localhost:50051 score "def f(x): return x" --top-k 5',
    )
    p.add_argument("--address", required=True, help="HOST:PORT of the teacher's gRPC port (default port 50051)")
    p.add_argument("--token", default=None, help="bearer token (default: env FUSEFLOW_TEACHER_TOKEN)")
    p.add_argument("--tls-ca", default=None, metavar="F", help="PEM CA certificate of the teacher's TLS cert (turns TLS on)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S", help="deadline of each call in seconds (default 60)")
    p.add_argument("--connect-timeout", type=float, default=5.0, metavar="S", help="give up connecting after S seconds (default 5)")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    info = sub.add_parser("info", help="model, tokenizer, vocabulary size, limits")
    info.add_argument("--json", action="store_true", help="machine-readable JSON")

    tok = sub.add_parser("tokenize", help="the teacher's tokens of TEXT, with character spans")
    tok.add_argument("text")
    tok.add_argument("--no-special-tokens", action="store_true", help="do not add BOS/EOS")
    tok.add_argument("--json", action="store_true", help="machine-readable JSON")

    score = sub.add_parser("score", help="logprob of each token of TEXT and the top-k alternatives")
    score.add_argument("text")
    score.add_argument("--top-k", type=int, default=5, help="alternatives per position (default 5)")
    score.add_argument("--temperature", type=float, default=1.0, help="logprobs of softmax(logits / T) (default 1)")
    score.add_argument("--json", action="store_true", help="machine-readable JSON")

    gen = sub.add_parser("generate", help="continue PROMPT")
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop-eos", action="store_true", help="stop at the tokenizer's EOS (needs the tokenizer locally)")
    gen.add_argument("--json", action="store_true", help="machine-readable JSON")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        with TeacherClient(args.address, token=args.token, tls_ca=args.tls_ca, timeout_s=args.timeout) as client:
            client.wait_ready(args.connect_timeout)
            out = ACTIONS[args.action](client, args)
    except TeacherRequestError as e:
        print(f"fuseflow query: rejected: {e.code.name}: {e.details}", file=sys.stderr)
        return 1
    except TeacherError as e:
        print(f"fuseflow query: error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


# ----------------------------------------------------------------------------------------------------------
# Actions: each returns the text to print.
# ----------------------------------------------------------------------------------------------------------


def do_info(client: TeacherClient, args) -> str:
    info = client.info()
    fields = {k: getattr(info, k) for k in TeacherInfo.__dataclass_fields__}
    if args.json:
        return json.dumps({"address": client.address, **fields})
    return "\n".join(f"{k:<11} {v}" for k, v in {"address": client.address, **fields}.items())


def do_tokenize(client: TeacherClient, args) -> str:
    (tok,) = client.tokenize([args.text], add_special_tokens=not args.no_special_tokens, return_tokens=True)
    spans = tok.offsets if tok.offsets is not None else np.zeros((len(tok.token_ids), 2), np.int32)  # [L, 2]
    rows = [
        {"position": i, "id": int(t), "token": s, "span": [int(a), int(b)], "text": args.text[a:b]}
        for i, (t, s, (a, b)) in enumerate(zip(tok.token_ids.tolist(), tok.tokens or [""] * len(tok.token_ids), spans.tolist()))
    ]
    if args.json:
        return json.dumps({"text": args.text, "tokens": rows}, ensure_ascii=False)
    table = [["pos", "id", "token", "span", "text"]]
    table += [[str(r["position"]), str(r["id"]), _quote(r["token"]), f"{r['span'][0]}:{r['span'][1]}", _quote(r["text"])] for r in rows]
    return _format_table(table, right={0, 1})


def do_score(client: TeacherClient, args) -> str:
    (scored,) = client.score_texts([args.text], top_k=args.top_k, temperature=args.temperature)
    tokens = scored.tokens or client.token_strings(scored.token_ids)
    alt_tokens = np.asarray(client.token_strings(scored.topk_ids.reshape(-1)), dtype=object).reshape(scored.topk_ids.shape)  # [L-1, k]
    positions = [
        {
            "position": t + 1,  # row t predicts token t + 1
            "id": int(scored.token_ids[t + 1]),
            "token": tokens[t + 1],
            "logprob": float(scored.gold_logprobs[t]),
            "rank": _rank(scored.topk_ids[t], int(scored.token_ids[t + 1])),
            "top_k": [
                {"id": int(i), "token": s, "logprob": float(lp)}
                for i, s, lp in zip(scored.topk_ids[t].tolist(), alt_tokens[t], scored.topk_logprobs[t].tolist())
            ],
        }
        for t in range(len(scored.gold_logprobs))
    ]
    summary = {"tokens": len(scored.token_ids), "nll": scored.nll, "ce": scored.ce}
    if args.json:
        return json.dumps(
            {"text": args.text, "model": client.name, "first_token": tokens[0] if tokens else None, **summary,
             "positions": positions},
            ensure_ascii=False,
        )
    table = [["pos", "token", "logprob", "rank", f"top-{args.top_k}"]]
    for p in positions:
        alts = "  ".join(f"{_quote(a['token'])} ({a['logprob']:.3f})" for a in p["top_k"])
        table.append([str(p["position"]), _quote(p["token"]), f"{p['logprob']:.3f}", p["rank"] or f">{args.top_k}", alts])
    foot = f"{summary['tokens']} tokens, NLL {summary['nll']:.3f} nats, {summary['ce']:.3f} nats/token ({client.name})"
    return _format_table(table, right={0, 2, 3}) + "\n" + foot


def do_generate(client: TeacherClient, args) -> str:
    (prompt,) = client.tokenize([args.prompt], add_special_tokens=True, return_tokens=False)
    tokenizer = _local_tokenizer(client.info().tokenizer)
    stops = [tokenizer.eos_token_id] if args.stop_eos and tokenizer is not None and tokenizer.eos_token_id is not None else []
    if args.stop_eos and not stops:
        raise ValueError("--stop-eos needs the teacher's tokenizer on this machine (its path from `info`)")
    out = client.generate(prompt.token_ids, args.max_new_tokens, args.temperature, args.top_p, stops, args.seed)
    tokens = client.token_strings(out.token_ids)
    text = tokenizer.decode(out.token_ids.tolist()) if tokenizer is not None else None
    if args.json:
        return json.dumps(
            {"prompt": args.prompt, "text": text, "finish_reason": out.finish_reason,
             "tokens": [{"id": int(i), "token": s, "logprob": float(lp)}
                        for i, s, lp in zip(out.token_ids.tolist(), tokens, out.logprobs.tolist())]},
            ensure_ascii=False,
        )
    table = [["#", "id", "token", "logprob"]]
    table += [[str(n), str(i), _quote(s), f"{lp:.3f}"] for n, (i, s, lp) in enumerate(zip(out.token_ids.tolist(), tokens, out.logprobs.tolist()))]
    lines = [_format_table(table, right={0, 1, 3}), f"finish_reason: {out.finish_reason}"]
    if text is not None:
        lines.append(f"text: {text!r}")
    return "\n".join(lines)


ACTIONS = {"info": do_info, "tokenize": do_tokenize, "score": do_score, "generate": do_generate}


# ----------------------------------------------------------------------------------------------------------
# Formatting.
# ----------------------------------------------------------------------------------------------------------


def _rank(topk_ids: np.ndarray, token: int) -> int | None:
    """1-based rank of ``token`` among the top-k, None when it is not in them."""
    hit = np.flatnonzero(topk_ids == token)
    return int(hit[0]) + 1 if hit.size else None


def _quote(s: str) -> str:
    """A token as a JSON string literal: whitespace and control characters stay visible."""
    return json.dumps(s, ensure_ascii=False)


def _format_table(rows: list[list], right: set[int] = frozenset()) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _local_tokenizer(path: str):
    """The teacher's tokenizer when its path exists on this machine (to decode generated text), else None."""
    if not path or not os.path.exists(path):
        return None
    try:
        from fuseflow.models import load_tokenizer

        return load_tokenizer(path)
    except Exception:  # a path that is not a tokenizer: decoding is a nicety, not a requirement
        return None
