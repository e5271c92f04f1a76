"""Build a model from its name (``timm:<name>``, ``pytorchvideo:<hub name>``) and local weights.

Every model comes back returning logits for ``num_classes`` classes; weights from a checkpoint are
loaded with ``torch.load(weights_only=True)`` and never through pickle.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unfreeze_hpo.errors import ModelError, Problem

FAMILIES = ("timm", "pytorchvideo")


@dataclass(frozen=True)
class ModelSpec:
    """What to build: ``name`` is ``family:arch``; ``kwargs`` go to the family's builder."""

    name: str
    pretrained: bool = False
    checkpoint: str | None = None
    num_classes: int | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)


def build(spec: ModelSpec) -> nn.Module:
    """Build ``spec``: architecture, pretrained hub weights, classifier size, then checkpoint."""
    family, arch = parse_name(spec.name)
    if spec.num_classes is not None and (
        isinstance(spec.num_classes, bool) or not isinstance(spec.num_classes, int)
    ):
        raise ModelError(
            Problem("model.num_classes", spec.num_classes, "must be an integer", "e.g. 10")
        )
    if spec.num_classes is not None and spec.num_classes < 1:
        raise ModelError(Problem("model.num_classes", spec.num_classes, "must be >= 1", "e.g. 10"))
    model = _build_timm(arch, spec) if family == "timm" else _build_pytorchvideo(arch, spec)
    if spec.checkpoint is not None:
        load_checkpoint(model, spec.checkpoint)
    return model


def parse_name(name: str) -> tuple[str, str]:
    """Split ``family:arch`` and check that the architecture exists."""
    family, sep, arch = name.partition(":")
    if not sep or not arch:
        raise ModelError(
            Problem(
                "model.name",
                name,
                "a model name carries its family",
                "write timm:<name> (e.g. timm:resnet18) or pytorchvideo:<name> "
                "(e.g. pytorchvideo:slow_r50)",
            )
        )
    if family not in FAMILIES:
        raise ModelError(
            Problem(
                "model.name",
                name,
                f"unknown model family {family!r}",
                f"use one of {', '.join(f + ':' for f in FAMILIES)} e.g. timm:resnet18",
            )
        )
    if family == "pytorchvideo" and arch in SMALL_PYTORCHVIDEO:
        return family, arch  # built here: no need to import the hub to know it exists
    known = available(family)
    base = arch.split(".")[0] if family == "timm" else arch  # timm allows name.pretrained_tag
    if base not in known:
        raise ModelError(
            Problem(
                "model.name",
                name,
                f"unknown {family} model",
                _did_you_mean(
                    base,
                    known,
                    f"list them with `unfreeze-hpo models {family}`",
                    prefix=f"{family}:",
                ),
            )
        )
    return family, arch


def available(family: str) -> list[str]:
    """Architecture names a family can build, sorted."""
    if family == "timm":
        import timm

        return list(timm.list_models())
    if family == "pytorchvideo":
        return sorted([*_pytorchvideo_hub(), *SMALL_PYTORCHVIDEO])
    raise ModelError(Problem("family", family, "unknown model family", f"one of {FAMILIES}"))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DataParallel / DistributedDataParallel wrappers."""
    while isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def classifier_name(model: nn.Module) -> str:
    """Dotted name of the final linear projection that produces the class logits."""
    model = unwrap(model)
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):  # timm
        target = get_classifier()
        for name, module in model.named_modules():
            if module is target:
                return name
    from pytorchvideo.models.net import Net
    from pytorchvideo.models.vision_transformers import MultiscaleVisionTransformers

    if isinstance(model, MultiscaleVisionTransformers):
        return "head.proj"
    if isinstance(model, Net):
        return f"blocks.{len(model.blocks) - 1}.proj"
    raise ModelError(
        Problem(
            "model",
            type(model).__name__,
            "cannot find the classifier of this model",
            "use a timm or pytorchvideo model",
        )
    )


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


def _build_timm(arch: str, spec: ModelSpec) -> nn.Module:
    import timm

    kwargs = dict(spec.kwargs)
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    try:
        return timm.create_model(arch, pretrained=spec.pretrained, **kwargs)
    except TypeError as exc:
        raise ModelError(
            Problem(
                "model.kwargs",
                dict(spec.kwargs),
                f"rejected by timm:{arch} ({exc})",
                "remove or rename the argument the model does not take",
            )
        ) from exc
    except Exception as exc:
        if not spec.pretrained:
            raise
        raise _download_error(spec, exc) from exc


def _build_pytorchvideo(arch: str, spec: ModelSpec) -> nn.Module:
    builder: Callable[..., nn.Module]
    if arch in SMALL_PYTORCHVIDEO:
        if spec.pretrained:
            raise ModelError(
                Problem(
                    "model.pretrained",
                    True,
                    f"pytorchvideo:{arch} has no hub weights",
                    "set pretrained: false and give model.checkpoint",
                )
            )
        builder = SMALL_PYTORCHVIDEO[arch]
        kwargs: dict[str, Any] = dict(spec.kwargs)
    else:
        builder = _pytorchvideo_hub()[arch]
        kwargs = {"pretrained": spec.pretrained, **spec.kwargs}
    try:
        model = builder(**kwargs)
    except TypeError as exc:
        raise ModelError(
            Problem(
                "model.kwargs",
                dict(spec.kwargs),
                f"rejected by pytorchvideo:{arch} ({exc})",
                "remove or rename the argument the builder does not take",
            )
        ) from exc
    except Exception as exc:
        if not spec.pretrained:
            raise
        raise _download_error(spec, exc) from exc
    head: Any = model.get_submodule(classifier_name(model).rpartition(".")[0])
    # pytorchvideo heads may end in a softmax (x3d, r2plus1d); the loss expects logits.
    if getattr(head, "activation", None) is not None:
        head.activation = None
    if spec.num_classes is not None and head.proj.out_features != spec.num_classes:
        head.proj = nn.Linear(head.proj.in_features, spec.num_classes)
    return model


def _download_error(spec: ModelSpec, exc: Exception) -> ModelError:
    return ModelError(
        Problem(
            "model.pretrained",
            True,
            f"could not load hub weights for {spec.name} ({type(exc).__name__}: {exc})",
            "check network access to the model hub, or set pretrained: false "
            "and give model.checkpoint",
        )
    )


def _pytorchvideo_hub() -> dict[str, Callable[..., nn.Module]]:
    from pytorchvideo.models import hub

    return {
        name: fn
        for name, fn in vars(hub).items()
        if inspect.isfunction(fn) and not name.startswith("_") and "detection" not in name
    }


def mvit_tiny(**overrides: Any) -> nn.Module:
    """A 4-block MViT from pytorchvideo's builder for 4x32x32 clips: trains on a CPU."""
    from pytorchvideo.models.vision_transformers import create_multiscale_vision_transformers

    config: dict[str, Any] = {
        "spatial_size": 32,
        "temporal_size": 4,
        "depth": 4,
        "patch_embed_dim": 32,
        "conv_patch_embed_kernel": (3, 4, 4),
        "conv_patch_embed_stride": (2, 4, 4),
        "conv_patch_embed_padding": (1, 0, 0),
        "embed_dim_mul": [[1, 2.0], [3, 2.0]],
        "atten_head_mul": [[1, 2.0], [3, 2.0]],
        "pool_q_stride_size": [[1, 1, 2, 2], [3, 1, 2, 2]],
        "pool_kv_stride_adaptive": [1, 2, 2],
        "pool_kvq_kernel": [3, 3, 3],
        "head_dropout_rate": 0.0,
        "head_num_classes": 400,
    }
    config.update(overrides)
    return create_multiscale_vision_transformers(**config)


def resnet3d_tiny(
    *,
    input_channel: int = 3,
    stem_dim_out: int = 8,
    stage_depths: tuple[int, ...] = (1, 1, 1, 1),
    model_num_class: int = 400,
    dropout_rate: float = 0.0,
) -> nn.Module:
    """A shallow, narrow ResNet3D (stem + one bottleneck per stage) from pytorchvideo's parts.

    Temporal convolutions run from the stem on (as in I3D), so motion of a few pixels per frame
    is seen before spatial downsampling hides it.
    """
    from pytorchvideo.models.head import create_res_basic_head
    from pytorchvideo.models.net import Net
    from pytorchvideo.models.resnet import create_bottleneck_block, create_res_stage
    from pytorchvideo.models.stem import create_res_basic_stem

    blocks: list[nn.Module] = [
        create_res_basic_stem(
            in_channels=input_channel,
            out_channels=stem_dim_out,
            conv_kernel_size=(3, 7, 7),
            conv_padding=(1, 3, 3),
        )
    ]
    dim_in, dim_out = stem_dim_out, stem_dim_out * 4
    for i, depth in enumerate(stage_depths):
        temporal_kernel = 3
        blocks.append(
            create_res_stage(
                depth=depth,
                dim_in=dim_in,
                dim_inner=dim_out // 4,
                dim_out=dim_out,
                bottleneck=create_bottleneck_block,
                conv_a_kernel_size=(temporal_kernel, 1, 1),
                conv_a_stride=(1, 1, 1),
                conv_a_padding=(temporal_kernel // 2, 0, 0),
                conv_b_stride=(1, 1 if i == 0 else 2, 1 if i == 0 else 2),
            )
        )
        dim_in, dim_out = dim_out, dim_out * 2
    blocks.append(
        create_res_basic_head(
            in_features=dim_in,
            out_features=model_num_class,
            pool=nn.AdaptiveAvgPool3d,
            output_size=(1, 1, 1),
            dropout_rate=dropout_rate,
        )
    )
    return Net(blocks=nn.ModuleList(blocks))


# Small pytorchvideo architectures for CPU runs; kwargs override their defaults.
SMALL_PYTORCHVIDEO: dict[str, Callable[..., nn.Module]] = {
    "mvit_tiny": mvit_tiny,
    "resnet3d_tiny": resnet3d_tiny,
}


def _did_you_mean(word: str, choices: Any, otherwise: str, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(f"{prefix}{c}" for c in close) + "?"
    return otherwise
