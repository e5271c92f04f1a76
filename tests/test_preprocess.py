"""Preprocessing that follows the model, local pretrained files read the timm way, the test split,
mixup and label smoothing."""

from __future__ import annotations

import contextlib
import io
import math
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from unfreeze_hpo import config, data, models, train
from unfreeze_hpo.cli import main
from unfreeze_hpo.data import DataConfig
from unfreeze_hpo.errors import ConfigError, ModelError
from unfreeze_hpo.models import ModelSpec

LITE0 = models.input_of(ModelSpec("timm:efficientnet_lite0"))


def image_folder(root: Path, *, splits: tuple[str, ...] = ("train", "val"), n: int = 4) -> Path:
    """Two classes told apart by brightness, ``n`` 40-px images per class and split."""
    for split in splits:
        for label, value in (("dark", 40), ("light", 210)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 40), (value + i, value, value - i)).save(folder / f"{i}.png")
    return root


def test_a_timm_model_brings_its_size_interpolation_crop_and_mean(tmp_path: Path) -> None:
    assert LITE0 is not None
    assert (LITE0.size, LITE0.interpolation, LITE0.crop_pct) == (224, "bicubic", 0.875)
    assert LITE0.mean == pytest.approx((0.485, 0.456, 0.406))
    prep = data.resolve(DataConfig(kind="image_folder", root=str(tmp_path)), LITE0)
    assert (prep.size, prep.interpolation, prep.crop_pct) == (224, "bicubic", 0.875)
    picture = Image.new("RGB", (300, 200), (120, 30, 200))
    assert prep.eval is not None and prep.train is not None
    assert prep.eval(picture).shape == (3, 224, 224)
    steps = data.preprocess.describe(prep.eval)
    assert "Resize(size=256" in steps and "CenterCrop(size=(224, 224))" in steps
    assert "RandomResizedCrop" in data.preprocess.describe(prep.train)
    # The user's values win over the model's; without augmentation train is the eval transform.
    mine = DataConfig(
        kind="image_folder", root=str(tmp_path), size=64, mean=(0.5, 0.5, 0.5), augment=False
    )
    prep = data.resolve(mine, LITE0)
    assert (prep.size, prep.mean, prep.interpolation) == (64, (0.5, 0.5, 0.5), "bicubic")
    assert data.preprocess.describe(prep.train) == data.preprocess.describe(prep.eval)
    assert prep.train is not None and torch.equal(prep.train(picture), prep.train(picture))


def test_a_video_model_brings_its_frames_and_crop_and_train_clips_are_jittered() -> None:
    x3d = models.pytorchvideo.model_input("x3d_xs", torch.nn.Identity())
    assert (x3d.frames, x3d.size) == (4, 160)
    prep = data.resolve(DataConfig(kind="video_folder", root="unused"), x3d)
    assert prep.frames == 4 and prep.mean == pytest.approx((0.45, 0.45, 0.45))
    clip = torch.rand(3, 4, 180, 240) * 255
    assert prep.train is not None and prep.eval is not None
    torch.manual_seed(0)
    a, b = prep.train(clip), prep.train(clip)
    assert a.shape == b.shape == (3, 4, 160, 160) and not torch.equal(a, b)
    centre = prep.eval(clip)
    assert centre.shape == (3, 4, 160, 160) and torch.equal(centre, prep.eval(clip))
    # Normalised with Kinetics statistics: a mid-grey clip comes out near (128/255-0.45)/0.225.
    grey = prep.eval(torch.full((3, 4, 180, 240), 128.0))
    assert grey.mean().item() == pytest.approx((128 / 255 - 0.45) / 0.225, abs=1e-3)


def test_synthetic_kinds_keep_their_small_sizes() -> None:
    prep = data.resolve(DataConfig(), LITE0)
    assert (prep.size, prep.frames, prep.train) == (32, 4, None)
    assert data.load(DataConfig(train_samples=4, val_samples=2)).input_shape == (3, 4, 32, 32)


def test_validate_prints_the_preprocessing_and_warns_when_the_size_is_far_too_small(
    tmp_path: Path,
) -> None:
    root = image_folder(tmp_path / "d", n=1)
    path = tmp_path / "c.yaml"
    path.write_text(
        f"model: {{name: 'timm:efficientnet_lite0'}}\ndata: {{kind: image_folder, root: {root}}}\n"
    )
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["validate", str(path)]) == 0
    assert "preprocessing: 224 px, bicubic, crop_pct 0.875" in out.getvalue()
    assert "timm's pretrained config of efficientnet_lite0" in out.getvalue()
    assert "train: RandomResizedCrop" in out.getvalue() and "eval:  Resize" in out.getvalue()
    assert "warning" not in err.getvalue()

    path.write_text(path.read_text().replace("root:", "size: 32, root:"))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert main(["validate", str(path)]) == 0
    assert "warning: data.size 32 is below a quarter of the model's input size (224" in (
        err.getvalue()
    )
    assert "near-chance accuracy" in err.getvalue()


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A timm-format file: test_resnet's state dict with its 1000-class ImageNet classifier."""
    import timm

    path = tmp_path_factory.mktemp("weights") / "test_resnet.pth"
    torch.manual_seed(7)
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    return path


def test_a_pretrained_file_loads_the_timm_way_with_a_fresh_classifier(resnet_file: Path) -> None:
    saved = torch.load(resnet_file, weights_only=True)
    spec = ModelSpec("timm:test_resnet", num_classes=3, pretrained_file=str(resnet_file))
    model = models.build(spec)
    own = model.state_dict()
    assert own["fc.weight"].shape == (3, saved["fc.weight"].shape[1])
    backbone = [k for k in saved if not k.startswith("fc.")]
    assert backbone and all(torch.equal(own[k], saved[k]) for k in backbone)
    # in_chans=1: timm adapts the stem to the file's three channels instead of refusing it.
    gray = models.build(
        ModelSpec("timm:test_resnet", kwargs={"in_chans": 1}, pretrained_file=str(resnet_file))
    )
    stem = next(k for k in saved if saved[k].ndim == 4)
    assert gray.state_dict()[stem].shape[1] == 1


def test_bad_pretrained_files_are_refused_naming_the_field(
    tmp_path: Path, resnet_file: Path
) -> None:
    def refused(path: Path) -> str:
        with pytest.raises(ModelError) as caught:
            models.build(ModelSpec("timm:test_resnet", pretrained_file=str(path)))
        (problem,) = caught.value.problems
        assert problem.field == "model.pretrained_file" and problem.value == str(path)
        return f"{problem.message} | {problem.fix}"

    assert "no such file" in refused(tmp_path / "missing.pth")
    pickled = tmp_path / "pickled.pth"
    with pickled.open("wb") as handle:
        pickle.dump({"weights": object()}, handle, protocol=2)  # would run code on loading
    assert "refused" in refused(pickled)
    renamed = tmp_path / "renamed.pth"
    state = torch.load(resnet_file, weights_only=True)
    state["trunk.extra"] = state.pop("conv1.0.weight")
    torch.save(state, renamed)
    message = refused(renamed)
    assert "missing: conv1.0.weight" in message and "unexpected: trunk.extra" in message


def test_pretrained_and_pretrained_file_together_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"model\.pretrained"):
        config.from_dict(
            {"model": {"name": "timm:test_resnet", "pretrained": True, "pretrained_file": "w.pth"}}
        )


def test_a_test_split_is_reported_beside_val_at_the_best_val_epoch(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "d", splits=("train", "val", "test"))
    assert data.check(DataConfig(kind="image_folder", root=str(root))) == []
    (root / "test" / "light").rename(root / "test" / "bright")
    problems = data.check(DataConfig(kind="image_folder", root=str(root)))
    assert any("test/" in p.message and "bright" in p.message for p in problems)
    (root / "test" / "bright").rename(root / "test" / "light")

    cfg = config.from_dict(
        {
            "model": {"name": "timm:test_resnet"},
            "data": {"kind": "image_folder", "root": str(root), "size": 32},
            "epochs": 3,
            "batch_size": 4,
            "optimizer": {"lr": 0.01},
            "strategy": {"name": "full"},
            "output_dir": str(tmp_path / "run"),
        }
    )
    reported: list[dict[str, float]] = []
    summary = train.run(cfg, lambda m, _: reported.append(m), log=lambda _: None)
    assert all({"test_acc", "test_loss", "test_acc_at_best"} <= set(m) for m in reported)
    best = max(range(len(reported)), key=lambda i: (reported[i]["val_acc"], -i))
    assert summary.best_epoch == best
    assert reported[-1]["test_acc_at_best"] == reported[best]["test_acc"]
    # Without a test split there are no test metrics.
    plain = cfg.replace(
        data=DataConfig(kind="image_folder", root=str(image_folder(tmp_path / "e")), size=32),
        epochs=1,
        output_dir=str(tmp_path / "plain"),
    )
    last: list[dict[str, float]] = []
    train.run(plain, lambda m, _: last.append(m), log=lambda _: None)
    assert not any(k.startswith("test_") for k in last[0])


def test_mixup_and_label_smoothing_train_and_an_odd_batch_is_refused(tmp_path: Path) -> None:
    base = {
        "model": {"name": "timm:test_resnet"},
        "data": {
            "kind": "synthetic_image",
            "train_samples": 18,
            "val_samples": 8,
            "mixup": 0.4,
            "cutmix": 1.0,
        },
        "epochs": 1,
        "batch_size": 4,
        "label_smoothing": 0.1,
        "output_dir": str(tmp_path / "mix"),
    }
    cfg = config.from_dict(base)
    trial = train.setup(cfg, log=lambda _: None)
    assert (
        trial.mixup is not None and trial.steps_per_epoch == 4
    )  # 18 // 4: the ragged batch dropped
    inputs, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    _, soft = trial.mixup(inputs.clone(), labels)
    assert soft.shape == (4, trial.datasets.num_classes) and soft.sum(1).allclose(torch.ones(4))
    assert soft.max() < 1  # label smoothing is in the soft targets
    summary = train.run(cfg, log=lambda _: None)
    assert math.isfinite(summary.final["train_loss"])

    with pytest.raises(ConfigError, match="batch_size"):
        config.from_dict({**base, "batch_size": 5})
    video = {**base, "data": {"kind": "synthetic_video", "cutmix": 1.0}}
    with pytest.raises(ConfigError, match=r"data\.cutmix"):
        config.from_dict(video)
