"""Local weights into a model: ``torch.load(weights_only=True)``, never pickle; every key must
fit, only the classifier may differ (it keeps its fresh init)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from unfreeze_hpo.errors import ModelError, Problem
from unfreeze_hpo.models.base import classifier_name, unwrap


def load_checkpoint(
    model: nn.Module, path: str | Path, *, fresh_classifier: bool = False
) -> list[str]:
    """Load weights from ``path`` into ``model``; returns the classifier keys left at init.

    Accepts a raw state dict or one nested under ``state_dict`` / ``model``, with or without a
    ``module.`` prefix. Every key must match; only the classifier may differ in shape (a
    checkpoint fine-tuned for another number of classes), in which case it keeps its fresh init.
    With ``fresh_classifier`` the classifier always keeps its init (a backbone pretrained on
    another task whose classes mean something else).
    """
    path = Path(path)
    fix_file = "give the path of a file written by torch.save(model.state_dict(), path)"
    if not path.is_file():
        raise ModelError(Problem("model.checkpoint", str(path), "no such file", fix_file))
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or pickled payloads
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            Problem(
                "model.checkpoint",
                str(path),
                f"not a readable weights-only checkpoint ({type(exc).__name__}: {reason})",
                "re-save it with torch.save(model.state_dict(), path); "
                "checkpoints that need pickle to load are refused",
            )
        ) from exc
    state = _state_dict_from(payload)
    if state is None:
        raise ModelError(
            Problem("model.checkpoint", str(path), "holds no tensor state dict", fix_file)
        )
    target = unwrap(model)
    own = target.state_dict()
    head_prefix = classifier_name(target) + "."
    skipped = [
        k
        for k, v in state.items()
        if k in own and k.startswith(head_prefix) and (fresh_classifier or v.shape != own[k].shape)
    ]
    mismatched = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape and k not in skipped
    ]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        ):
            if keys:
                more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
                parts.append(f"{label}: {', '.join(keys[:3])}{more}")
        raise ModelError(
            Problem(
                "model.checkpoint",
                str(path),
                "does not fit the model (" + "; ".join(parts) + ")",
                "use the checkpoint written for this model.name and model.kwargs",
            )
        )
    for k in skipped:
        state[k] = own[k]
    target.load_state_dict(state, strict=True)
    return skipped


def _state_dict_from(payload: Any) -> dict[str, torch.Tensor] | None:
    for key in ("state_dict", "model"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
            break
    if not isinstance(payload, dict) or not payload:
        return None
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()):
        return None
    if all(k.startswith("module.") for k in payload):
        payload = {k.removeprefix("module."): v for k, v in payload.items()}
    return dict(payload)
