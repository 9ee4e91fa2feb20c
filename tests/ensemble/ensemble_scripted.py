"""A scripted teacher: real tokenizer, no model. It continues a fixed script and scores tokens by whether
their text is in the words it likes — so a test knows which candidate every rerank rule must pick."""

from __future__ import annotations

import numpy as np

from fuseflow.ensemble.sources import EnsembleSource
from fuseflow.sparse import ScoredText
from fuseflow.score.engine import Generated

LIKED, DISLIKED = -0.5, -6.0


class ScriptedTeacher:
    def __init__(self, tokenizer, script: str, likes: str, eos_at_end: bool = True, likes_eos: bool = True,
                 max_length: int = 1024):
        self.tokenizer = tokenizer
        self.script = script
        self.likes = likes
        self.eos_at_end = eos_at_end
        self.likes_eos = likes_eos
        self.max_length = max_length
        self.generate_calls: list[np.ndarray] = []
        self.score_calls = 0

    def _logprob(self, token: int) -> float:
        """What it thinks of one token: its generation and its scoring agree, as a model's do."""
        if token == self.tokenizer.eos_token_id:
            return LIKED if self.likes_eos else DISLIKED
        piece = self.tokenizer.decode([token], skip_special_tokens=True).strip()
        return LIKED if not piece or piece in self.likes else DISLIKED  # a bare space: neutral

    def _continuation(self, text: str) -> str:
        # Resume after the longest prefix of the script the text ends with (another source's words may
        # have been chosen in between).
        for k in range(len(self.script), 0, -1):
            if text.endswith(self.script[:k]):
                return self.script[k:]
        return self.script

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, top_p=1.0, stop_token_ids=(), seed=None):
        prompt_ids = np.asarray(prompt_ids)
        self.generate_calls.append(prompt_ids.copy())
        text = self.tokenizer.decode(prompt_ids, skip_special_tokens=True)
        cont = self._continuation(text)
        enc = self.tokenizer(text + cont, return_offsets_mapping=True, add_special_tokens=False)
        offsets = np.asarray(enc["offset_mapping"]).reshape(-1, 2)
        ids = [i for i, (s, e) in zip(enc["input_ids"], offsets) if e > len(text)]
        if self.eos_at_end:
            ids.append(self.tokenizer.eos_token_id)
        ids = ids[:max_new_tokens]
        stopped = bool(ids) and ids[-1] in set(stop_token_ids)
        logprobs = np.asarray([self._logprob(t) for t in ids], dtype=np.float32)
        return Generated(np.asarray(ids, dtype=np.int32), logprobs, "stop" if stopped else "length")

    def score_ids(self, ids, top_k, temperature=1.0):
        self.score_calls += 1
        out = []
        for seq in ids:
            seq = np.asarray(seq)
            gold = [self._logprob(t) for t in seq[1:].tolist()]
            n = len(seq) - 1
            out.append(ScoredText(seq.astype(np.int32), None, None, np.zeros((n, top_k), np.int32),
                                  np.zeros((n, top_k), np.float32), np.asarray(gold, np.float32)))
        return out


class StreamingScriptedTeacher(ScriptedTeacher):
    """As :class:`ScriptedTeacher`, with ``stop_when`` called after each token, as the in-process ``hf``
    engine does: the decoder then cuts inside the generation, on partial proposals."""

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, top_p=1.0, stop_token_ids=(), seed=None,
                 stop_when=None):
        g = super().generate(prompt_ids, max_new_tokens, temperature, top_p, stop_token_ids, seed)
        if stop_when is None:
            return g
        for n in range(1, g.token_ids.size + 1):
            if int(g.token_ids[n - 1]) in set(stop_token_ids):
                break
            if stop_when(g.token_ids[:n].copy()):
                return Generated(g.token_ids[:n], g.logprobs[:n], "stop")
        return g


def scripted_source(name, tokenizer, script, likes, streaming: bool = False, **kw) -> EnsembleSource:
    """``streaming``: the teacher takes ``stop_when`` (:class:`StreamingScriptedTeacher`)."""
    teacher = (StreamingScriptedTeacher if streaming else ScriptedTeacher)(tokenizer, script, likes, **kw)
    return EnsembleSource(name=name, teacher=teacher, tokenizer=tokenizer, max_length=teacher.max_length,
                          stop_token_ids=(tokenizer.eos_token_id,))
