"""The timm family: ``timm:<name>`` is ``timm.create_model(name)`` (hub weights with
``pretrained: true``, a local file with ``pretrained_file``), its classifier the one
``get_classifier`` returns, its input the model's pretrained config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from unfreeze_hpo.data.spec import ModelInput
from unfreeze_hpo.errors import ModelError, Problem, describe
from unfreeze_hpo.models import hub
from unfreeze_hpo.models.base import Family, ModelSpec, call_builder, register_family


def build(arch: str, spec: ModelSpec) -> nn.Module:
    import timm

    kwargs = dict(spec.kwargs)
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    if spec.pretrained and hub.timm_cache() is not None:  # else timm's default caches
        kwargs.setdefault("cache_dir", hub.timm_cache())
    if spec.pretrained_file is None:
        return call_builder(timm.create_model, spec, arch, pretrained=spec.pretrained, **kwargs)
    # timm's own loading of a local file: it drops a classifier of another size and adapts the
    # input channels, as it does for hub weights.
    keys = _file_keys(spec.pretrained_file)
    overlay = {"file": str(Path(spec.pretrained_file).expanduser())}
    try:
        return call_builder(
            timm.create_model, spec, arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs
        )
    except RuntimeError as exc:
        if "state_dict" not in str(exc):
            raise
        own = timm.create_model(arch, pretrained=False, **kwargs).state_dict()
        raise _misfit(spec.pretrained_file, keys, set(own)) from exc


def _file_keys(path: str) -> set[str]:
    """The tensor names in a weights file, read weights-only: a pickled file is refused."""
    import torch

    file = Path(path).expanduser()
    fix = "give a file written by torch.save(model.state_dict(), path) or a .safetensors file"
    if not file.is_file():
        raise ModelError(Problem("model.pretrained_file", path, "no such file", fix))
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), "pt") as handle:
                return set(handle.keys())
        payload = torch.load(file, map_location="meta", weights_only=True)
    except Exception as exc:  # pickled objects, truncated or foreign files
        raise ModelError(
            Problem(
                "model.pretrained_file",
                path,
                f"not a readable weights-only file ({describe(exc)[:200]})",
                fix + "; files that need pickle to load are refused",
            )
        ) from exc
    for key in ("state_dict", "model"):  # the nestings timm's load_state_dict unwraps
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
    if not isinstance(payload, dict) or not payload:
        raise ModelError(Problem("model.pretrained_file", path, "holds no state dict", fix))
    return {str(k).removeprefix("module.") for k in payload}


def _misfit(path: str, keys: set[str], own: set[str]) -> ModelError:
    missing, unexpected = sorted(own - keys), sorted(keys - own)
    parts = [
        f"{label}: {', '.join(names[:3])}"
        + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        for label, names in (("missing", missing), ("unexpected", unexpected))
        if names
    ]
    found = "; ".join(parts) or "tensor shapes differ"
    return ModelError(
        Problem(
            "model.pretrained_file",
            path,
            f"does not fit the model ({found})",
            "use weights saved from this architecture (timm names), or set model.name to "
            "the architecture they come from",
        )
    )


def weights_url(arch: str, spec: ModelSpec) -> str | None:
    """Where timm downloads ``arch``'s weights: its Hugging Face hub repository, else its URL
    (``model.kwargs.pretrained_cfg_overlay`` may change either, as it does for timm)."""
    import timm
    from huggingface_hub import constants

    cfg = timm.models.get_pretrained_cfg(arch)
    found = {} if cfg is None else cfg.to_dict()
    found.update(dict(spec.kwargs).get("pretrained_cfg_overlay") or {})
    if found.get("hf_hub_id"):
        return f"{constants.ENDPOINT}/{found['hf_hub_id']}"
    return found.get("url") or None


def available() -> list[str]:
    import timm

    return list(timm.list_models())


def classifier(model: nn.Module) -> str | None:
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        target = get_classifier()
        for name, module in model.named_modules():
            if module is target:
                return name
    return None


def model_input(arch: str, model: nn.Module) -> ModelInput | None:
    from timm.data import resolve_model_data_config

    cfg: dict[str, Any] = resolve_model_data_config(model)
    return ModelInput(
        size=int(cfg["input_size"][-1]),
        frames=None,
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=str(cfg.get("interpolation") or "bilinear"),
        crop_pct=float(cfg.get("crop_pct") or 0.875),
        source=f"timm's pretrained config of {arch}",
    )


FAMILY = register_family(
    Family(
        "timm",
        build,
        available,
        classifier,
        example="resnet18",
        example_input=(1, 3, 64, 64),
        base_name=lambda arch: arch.split(".")[0],
        input=model_input,
        weights_url=weights_url,
    )
)
