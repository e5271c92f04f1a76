"""The timm family: ``timm:<name>`` is ``timm.create_model(name)`` (hub weights with
``pretrained: true``), its classifier the one ``get_classifier`` returns."""

from __future__ import annotations

from torch import nn

from unfreeze_hpo.models.base import Family, ModelSpec, call_builder, register_family


def build(arch: str, spec: ModelSpec) -> nn.Module:
    import timm

    kwargs = dict(spec.kwargs)
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    return call_builder(timm.create_model, spec, arch, pretrained=spec.pretrained, **kwargs)


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


FAMILY = register_family(
    Family(
        "timm",
        build,
        available,
        classifier,
        example="resnet18",
        example_input=(1, 3, 64, 64),
        base_name=lambda arch: arch.split(".")[0],
    )
)
