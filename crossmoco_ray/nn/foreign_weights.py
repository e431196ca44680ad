"""Loading state dicts from other codebases: prefix stripping and checked loading.

CrossPoint and CrossMoCo save the same DGCNN / ResNet layouts under different prefixes
(``module.`` from DataParallel, ``point_model_q.`` from a wrapper, ``resnet.`` for the image trunk).
Loading is strict about what matters: :func:`load_checked` raises with the list of mismatched keys and
shapes unless the only missing keys are the ones the caller declared.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

PREFIXES = (
    "module.",
    "_orig_mod.",
    "point_model_q.",
    "point_model_k.",
    "point_model.",
    "img_model_q.",
    "img_model_k.",
    "img_model.",
    "point_q.",
    "image_q.",
)


def strip_prefixes(
    state: Mapping[str, torch.Tensor], prefixes: Iterable[str] = PREFIXES
) -> dict[str, torch.Tensor]:
    """Remove any of ``prefixes`` (repeatedly) from the start of every key."""
    prefixes = tuple(prefixes)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for p in prefixes:
                if key.startswith(p):
                    key, stripped = key[len(p) :], True
        out[key] = value
    return out


def load_checked(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    allowed_missing: Iterable[str] = (),
    ignored_unexpected: Iterable[str] = (),
    what: str = "checkpoint",
) -> None:
    """Load ``state`` into ``module``; raise ``ValueError`` listing every mismatch.

    Keys in ``allowed_missing`` may be absent (they keep their initialisation); keys starting with an
    entry of ``ignored_unexpected`` are dropped. Anything else missing, unexpected or of another shape
    is an error.
    """
    own = module.state_dict()
    ignored = tuple(ignored_unexpected)
    state = {k: v for k, v in state.items() if not (ignored and k.startswith(ignored))}
    missing = sorted(set(own) - set(state) - set(allowed_missing))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: {tuple(state[k].shape)} in {what}, {tuple(own[k].shape)} in the model"
        for k in set(own) & set(state)
        if tuple(own[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or shapes:
        lines = [f"{what} does not match {type(module).__name__}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                shown = ", ".join(keys[:20]) + (f" … (+{len(keys) - 20} more)" if len(keys) > 20 else "")
                lines.append(f"  {title} ({len(keys)}): {shown}")
        raise ValueError("\n".join(lines))
    module.load_state_dict(state, strict=False)
