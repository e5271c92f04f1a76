from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from unfreeze_hpo.blocks import Block, Blocks, discover, execution_order, validate
from unfreeze_hpo.errors import BlockError
from unfreeze_hpo.models import ModelSpec, build, classifier_name

# Models of every adapter, with an input small enough to run a forward pass on CPU.
CONTRACT_MODELS = {
    "timm:resnet18": (1, 3, 32, 32),
    "timm:vit_tiny_patch16_224": (1, 3, 224, 224),
    "timm:convnext_atto": (1, 3, 32, 32),
    "pytorchvideo:x3d_xs": (1, 3, 4, 160, 160),
    "pytorchvideo:mvit_tiny": (1, 3, 4, 32, 32),
    "pytorchvideo:resnet3d_tiny": (1, 3, 4, 32, 32),
}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: build(ModelSpec(name, num_classes=5)) for name in CONTRACT_MODELS}


def assert_partition(model: nn.Module, blocks: Blocks) -> None:
    names = [n for n, _ in model.named_parameters()]
    parts = [*blocks.blocks, blocks.head]
    assigned = [p for part in parts for p in part.params]
    assert sorted(assigned) == sorted(names), "every parameter in exactly one block or the head"
    assert all(b.params for b in blocks.blocks), "no empty block"
    numel = dict((n, p.numel()) for n, p in model.named_parameters())
    assert all(b.numel == sum(numel[p] for p in b.params) for b in parts)
    assert [b.index for b in blocks.blocks] == list(range(len(blocks)))
    assert len({b.name for b in blocks.blocks}) == len(blocks), "block names are unique"
    classifier = classifier_name(model) + "."
    assert any(p.startswith(classifier) for p in blocks.head.params), "classifier is in the head"


@pytest.mark.parametrize("granularity", ["fine", "coarse"])
@pytest.mark.parametrize("name", list(CONTRACT_MODELS))
def test_block_contract(models: dict[str, nn.Module], name: str, granularity: str) -> None:
    model = models[name]
    blocks = discover(model, granularity)  # type: ignore[arg-type]
    assert_partition(model, blocks)
    order = execution_order(model, blocks, torch.randn(*CONTRACT_MODELS[name]))
    assert order == [*range(len(blocks)), -1], "blocks run input -> output, then the head"


def test_fine_is_finer_than_coarse(models: dict[str, nn.Module]) -> None:
    for name in ("timm:resnet18", "timm:convnext_atto", "pytorchvideo:x3d_xs"):
        assert len(discover(models[name], "fine")) > len(discover(models[name], "coarse"))


@pytest.mark.slow
def test_mvit_base_16x4_has_16_transformer_blocks_after_its_stem() -> None:
    model = build(ModelSpec("pytorchvideo:mvit_base_16x4"))
    blocks = discover(model)
    assert_partition(model, blocks)
    assert blocks.adapter == "pytorchvideo-mvit"
    assert [b.name for b in blocks.blocks] == ["stem", *(f"blocks.{i}" for i in range(16))]
    assert blocks.blocks[-1].numel == 7_093_440  # block_15 of the field notes
    assert {p.split(".")[0] for p in blocks.blocks[0].params} == {
        "patch_embed",
        "cls_positional_encoding",
    }
    assert {p.split(".")[0] for p in blocks.head.params} == {"norm_embed", "head"}


@pytest.mark.slow
def test_slow_r50_is_stem_plus_four_stages_and_a_separate_head() -> None:
    model = build(ModelSpec("pytorchvideo:slow_r50", num_classes=10))
    coarse = discover(model, "coarse")
    assert_partition(model, coarse)
    assert [b.name for b in coarse.blocks] == [f"blocks.{i}" for i in range(5)]
    assert all(p.startswith("blocks.5.") for p in coarse.head.params)
    fine = discover(model, "fine")
    assert_partition(model, fine)
    assert len(fine) == 1 + 3 + 4 + 6 + 3  # stem + the bottlenecks of ResNet-50


def test_wrapped_models_are_unwrapped(models: dict[str, nn.Module], tmp_path: Path) -> None:
    model = models["timm:resnet18"]
    plain = discover(model)
    assert discover(nn.DataParallel(model)) == plain
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1
    )
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        assert discover(ddp) == plain
    finally:
        torch.distributed.destroy_process_group()


class Custom(nn.Module):
    """Registered out of numeric order on purpose."""

    def __init__(self) -> None:
        super().__init__()
        self.layer2 = nn.Linear(4, 4)
        self.stem = nn.Linear(4, 4)
        self.layer0 = nn.Linear(4, 4)
        self.layer1 = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layer2(self.layer1(self.layer0(self.stem(x)))))


MATCHER = {"stem": r"^stem", "blocks": r"^layer(\d+)"}


def test_regex_matcher_orders_by_name_not_registration() -> None:
    model = Custom()
    blocks = discover(model, matcher=MATCHER)
    assert blocks.adapter == "regex"
    assert [b.name for b in blocks.blocks] == ["stem", "layer0", "layer1", "layer2"]
    assert blocks.head.params == ("classifier.weight", "classifier.bias")
    assert execution_order(model, blocks, torch.randn(1, 4)) == [0, 1, 2, 3, -1]


def test_regex_matcher_works_on_timm_models_too(models: dict[str, nn.Module]) -> None:
    model = models["timm:resnet18"]
    blocks = discover(model, matcher={"stem": r"^conv1|^bn1", "blocks": r"^layer(\d+)"})
    assert [b.name for b in blocks.blocks] == ["conv1+bn1", *(f"layer{i}" for i in range(1, 5))]
    assert blocks.head.params == ("fc.weight", "fc.bias")


def test_bad_regex_names_the_matcher_key() -> None:
    with pytest.raises(BlockError) as exc:
        discover(Custom(), matcher={"stem": r"^stem", "blocks": r"^layer(\d+"})
    assert [p.field for p in exc.value.problems] == ["blocks.matcher.blocks"]


def test_matcher_that_matches_nothing_is_refused() -> None:
    with pytest.raises(BlockError, match="no backbone blocks"):
        discover(Custom(), matcher={"blocks": r"^nothing(\d+)"})


def test_unknown_module_without_matcher_asks_for_one() -> None:
    with pytest.raises(BlockError) as exc:
        discover(Custom())
    assert "blocks.matcher" in exc.value.problems[0].fix


def blocks_of(*groups: tuple[str, ...], head: tuple[str, ...]) -> Blocks:
    return Blocks(
        tuple(Block(i, f"g{i}", g, 0) for i, g in enumerate(groups)),
        Block(-1, "head", head, 0),
        "test",
    )


def test_validate_names_unassigned_parameters() -> None:
    partial = blocks_of(("stem.weight", "stem.bias"), head=("classifier.weight",))
    with pytest.raises(BlockError) as exc:
        validate(Custom(), partial)
    text = str(exc.value)
    assert "7 parameters belong to no block" in text
    assert "layer2.weight" in text and "and 2 more" in text


def test_validate_names_doubly_assigned_parameters() -> None:
    model = Custom()
    every = tuple(n for n, _ in model.named_parameters())
    doubled = blocks_of(every, ("layer1.weight",), head=())
    with pytest.raises(BlockError, match=r"layer1\.weight in g0 and g1"):
        validate(model, doubled)


def test_validate_refuses_empty_blocks() -> None:
    model = Custom()
    every = tuple(n for n, _ in model.named_parameters())
    with pytest.raises(BlockError, match="empty blocks"):
        validate(model, blocks_of(every, (), head=()))


def test_unknown_granularity() -> None:
    with pytest.raises(BlockError, match=r"blocks\.granularity"):
        discover(Custom(), "medium", MATCHER)  # type: ignore[arg-type]
