"""What the lm_head epilogue's two implementations share (:mod:`fuseflow.kernels.head` in torch,
:mod:`fuseflow.kernels.triton_head` in Triton): the model's logit transform and the vocabulary block size. Below
both, so neither imports the other's module for them (issue 25: the only import circle left in the library)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

# Vocabulary entries per block of block_topk (and of the Triton kernel's block maxima). For V = 128256 and
# k = 10: 1002 block maxima, then 10 · 128 = 1280 candidates per row.
DEFAULT_BLOCK = 128


# ----------------------------------------------------------------------------------------------------------
# The logit transform.
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitTransform:
    """What a causal LM (and the sampler) does to ``lm_head(hidden)``, in this order (as in transformers'
    modeling code): ``z · logit_scale`` (Cohere), ``z / logits_scaling`` (Granite), ``cap · tanh(z / cap)``
    (Gemma-2/3 ``final_logit_softcapping``), ``z / temperature``. ``None`` skips a step.

    Every step is monotone: increasing, except that a negative net scale (``logit_scale / logits_scaling
    < 0``) makes the whole transform decreasing (:attr:`increasing`). A zero or non-finite factor is refused:
    it would map every logit to one value (or NaN) and no top-k would mean anything.
    """

    logit_scale: float | None = None
    logits_scaling: float | None = None
    softcap: float | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        for name in ("logit_scale", "logits_scaling"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value != 0):
                raise ValueError(f"{name} must be a finite non-zero number or None, got {value!r}")
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise ValueError(f"softcap must be a finite number > 0 or None, got {self.softcap!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")

    @classmethod
    def from_config(cls, config, temperature: float = 1.0) -> LogitTransform:
        """The transform of a transformers config (its text config for multimodal ones): Gemma's
        ``final_logit_softcapping`` (0 or absent: none), Cohere's ``logit_scale``, Granite's
        ``logits_scaling``."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        return cls(
            logit_scale=_optional_float(getattr(config, "logit_scale", None)),
            logits_scaling=_optional_float(getattr(config, "logits_scaling", None)),
            softcap=_optional_float(getattr(config, "final_logit_softcapping", None) or None),
            temperature=float(temperature),
        )

    def with_temperature(self, temperature: float) -> LogitTransform:
        return dataclasses.replace(self, temperature=float(temperature))

    @property
    def is_identity(self) -> bool:
        unscaled = self.logit_scale is None and self.logits_scaling is None
        return unscaled and self.softcap is None and self.temperature == 1.0

    @property
    def increasing(self) -> bool:
        """True when a larger raw logit never gives a smaller transformed one (net scale > 0)."""
        return ((self.logit_scale or 1.0) > 0) == ((self.logits_scaling or 1.0) > 0)


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def apply_logit_transform(logits: torch.Tensor, transform: LogitTransform, *, inplace: bool = False) -> torch.Tensor:
    """``transform`` applied elementwise in ``logits``' own dtype (upcast first for fp32 math); returns
    ``logits`` itself when ``inplace`` (or when the transform is the identity), else a new tensor."""
    ops: list[tuple[str, float | None]] = []
    if transform.logit_scale is not None:
        ops.append(("mul", transform.logit_scale))
    if transform.logits_scaling is not None:
        ops.append(("div", transform.logits_scaling))
    if transform.softcap is not None:
        ops += [("div", transform.softcap), ("tanh", None), ("mul", transform.softcap)]
    if transform.temperature != 1.0:
        ops.append(("div", transform.temperature))
    for i, (op, arg) in enumerate(ops):
        fresh = i == 0 and not inplace  # the first op allocates the output, the rest write into it
        if op == "tanh":
            logits = torch.tanh(logits) if fresh else logits.tanh_()
        elif op == "mul":
            logits = torch.mul(logits, arg) if fresh else logits.mul_(arg)
        else:
            logits = torch.div(logits, arg) if fresh else logits.div_(arg)
    return logits
