from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from unfreeze_hpo.errors import ModelError
from unfreeze_hpo.models import ModelSpec, available, build, classifier_name, load_checkpoint


def fields(exc: pytest.ExceptionInfo[ModelError]) -> list[str]:
    return [p.field for p in exc.value.problems]


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [("timm:resnet19", "timm:resnet18"), ("pytorchvideo:slow_r5", "pytorchvideo:slow_r50")],
)
def test_unknown_model_names_suggest_close_matches(name: str, suggestion: str) -> None:
    with pytest.raises(ModelError) as exc:
        build(ModelSpec(name))
    assert fields(exc) == ["model.name"]
    assert suggestion in exc.value.problems[0].fix


@pytest.mark.parametrize("name", ["resnet18", "torchvision:resnet18", "timm:"])
def test_names_without_a_known_family_are_refused(name: str) -> None:
    with pytest.raises(ModelError, match=r"model\.name"):
        build(ModelSpec(name))


def test_pytorchvideo_family_lists_hub_and_small_models() -> None:
    names = available("pytorchvideo")
    for expected in ("mvit_base_16x4", "slow_r50", "x3d_xs", "mvit_tiny", "resnet3d_tiny"):
        assert expected in names
    assert not [n for n in names if "detection" in n]


def test_timm_num_classes_and_kwargs_reach_the_model() -> None:
    model = build(ModelSpec("timm:vit_tiny_patch16_224", num_classes=7, kwargs={"img_size": 32}))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_bad_model_kwargs_name_the_field() -> None:
    with pytest.raises(ModelError) as exc:
        build(ModelSpec("pytorchvideo:resnet3d_tiny", kwargs={"no_such_arg": 1}))
    assert fields(exc) == ["model.kwargs"]


@pytest.mark.parametrize("num_classes", [0, True, "3"])
def test_bad_num_classes_is_refused(num_classes: object) -> None:
    with pytest.raises(ModelError, match=r"model\.num_classes"):
        build(ModelSpec("timm:resnet18", num_classes=num_classes))  # type: ignore[arg-type]


def test_pytorchvideo_head_is_replaced_and_returns_logits() -> None:
    model = build(ModelSpec("pytorchvideo:x3d_xs", num_classes=3))
    head = model.get_submodule(classifier_name(model).rpartition(".")[0])
    assert head.proj.out_features == 3
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 4, 160, 160))
    assert out.shape == (2, 3)
    # x3d's hub head ends in a softmax; logits must not be probabilities.
    assert not torch.allclose(out.sum(dim=1), torch.ones(2), atol=1e-3)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("pytorchvideo:mvit_tiny", (2, 3, 4, 32, 32)),
        ("pytorchvideo:resnet3d_tiny", (2, 3, 4, 32, 32)),
    ],
)
def test_small_pytorchvideo_models_train_on_cpu(name: str, shape: tuple[int, ...]) -> None:
    model = build(ModelSpec(name, num_classes=4))
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    loss = nn.functional.cross_entropy(model(torch.randn(*shape)), torch.tensor([0, 3]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_small_models_have_no_hub_weights() -> None:
    with pytest.raises(ModelError, match=r"model\.pretrained"):
        build(ModelSpec("pytorchvideo:mvit_tiny", pretrained=True))


def test_pytorchvideo_pretrained_downloads_through_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    import pytorchvideo.models.hub.x3d as hub_x3d

    urls: list[str] = []

    def offline(url: str, **_: object) -> dict[str, torch.Tensor]:
        urls.append(url)
        raise OSError("network unreachable")

    monkeypatch.setattr(hub_x3d, "load_state_dict_from_url", offline)
    with pytest.raises(ModelError) as exc:
        build(ModelSpec("pytorchvideo:x3d_xs", pretrained=True, num_classes=3))
    assert fields(exc) == ["model.pretrained"]
    assert "network unreachable" in exc.value.problems[0].message
    assert urls and urls[0].endswith(".pyth")


def test_timm_pretrained_goes_through_timm_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm.models._builder as builder

    def offline(*_: object, **__: object) -> None:
        raise OSError("hub unreachable")

    monkeypatch.setattr(builder, "load_pretrained", offline)
    with pytest.raises(ModelError, match="hub unreachable"):
        build(ModelSpec("timm:resnet18", pretrained=True))


# --- checkpoints -----------------------------------------------------------------------------


@pytest.fixture
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return build(ModelSpec("pytorchvideo:resnet3d_tiny", num_classes=5))


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("layout", ["raw", "nested", "ddp_prefix"])
def test_checkpoint_round_trip(tiny: nn.Module, tmp_path: Path, layout: str) -> None:
    state = tiny.state_dict()
    payload: object = {
        "raw": state,
        "nested": {"state_dict": state, "epoch": 3},
        "ddp_prefix": {f"module.{k}": v for k, v in state.items()},
    }[layout]
    path = tmp_path / "w.pt"
    torch.save(payload, path)
    loaded = build(ModelSpec("pytorchvideo:resnet3d_tiny", num_classes=5, checkpoint=str(path)))
    assert same_weights(tiny, loaded)


def test_checkpoint_for_other_num_classes_keeps_fresh_classifier(
    tiny: nn.Module, tmp_path: Path
) -> None:
    path = tmp_path / "source.pt"
    torch.save(tiny.state_dict(), path)
    target = build(ModelSpec("pytorchvideo:resnet3d_tiny", num_classes=2))
    fresh_head = target.blocks[-1].proj.weight.detach().clone()
    skipped = load_checkpoint(target, path)
    assert sorted(skipped) == ["blocks.5.proj.bias", "blocks.5.proj.weight"]
    assert torch.equal(target.blocks[-1].proj.weight, fresh_head)
    assert torch.equal(target.blocks[0].conv.weight, tiny.blocks[0].conv.weight)


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such file"):
        build(ModelSpec("timm:resnet18", checkpoint=str(tmp_path / "nope.pt")))


def test_corrupt_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "broken.pt"
    path.write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(ModelError) as exc:
        build(ModelSpec("timm:resnet18", checkpoint=str(path)))
    assert fields(exc) == ["model.checkpoint"]
    assert "weights-only" in exc.value.problems[0].message


class Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("code ran while loading",))


def test_checkpoint_needing_pickle_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "evil.pt"
    with path.open("wb") as f:
        torch.save({"weights": torch.zeros(1), "extra": Payload()}, f, pickle_module=pickle)
    with pytest.raises(ModelError, match=r"model\.checkpoint"):
        build(ModelSpec("timm:resnet18", checkpoint=str(path)))
    assert "code ran" not in capsys.readouterr().out


def test_checkpoint_of_another_architecture_lists_the_keys(tiny: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(tiny.state_dict(), path)
    with pytest.raises(ModelError) as exc:
        build(ModelSpec("pytorchvideo:mvit_tiny", checkpoint=str(path)))
    message = exc.value.problems[0].message
    assert "missing" in message and "unexpected" in message


def test_checkpoint_with_shape_mismatch_outside_the_head(tiny: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "wide.pt"
    wide = build(
        ModelSpec("pytorchvideo:resnet3d_tiny", num_classes=5, kwargs={"stem_dim_out": 16})
    )
    torch.save(wide.state_dict(), path)
    with pytest.raises(ModelError, match="shape mismatch"):
        load_checkpoint(tiny, path)
