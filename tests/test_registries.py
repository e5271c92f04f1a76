"""Every extension point is a registry, and every registered entry keeps its contract.

Model families, block adapters, export formats, schedulers and strategies: a test here runs over
every entry, so one registered by a user (or added to the package) is held to the same promises.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from unfreeze_hpo import strategies
from unfreeze_hpo.blocks import ADAPTERS, Adapter, discover, register_adapter
from unfreeze_hpo.errors import ConfigError, ModelError
from unfreeze_hpo.models import FAMILIES, ModelSpec, build, classifier_name, parse_name
from unfreeze_hpo.results import export
from unfreeze_hpo.search.pruning import SCHEDULERS, SpikeAwareScheduler, make_scheduler


def example_model(name: str, num_classes: int = 3) -> nn.Module:
    """The (small) example model ``name``, randomly initialised on the CPU."""
    torch.manual_seed(0)
    return build(ModelSpec(name, num_classes=num_classes)).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_model_family_builds_a_classifier_of_the_asked_size(family: str) -> None:
    entry = FAMILIES[family]
    name = f"{family}:{entry.example}"
    assert parse_name(name) == (family, entry.example)
    assert entry.base_name(entry.example) in entry.available()
    model = example_model(name, num_classes=3)
    head = model.get_submodule(classifier_name(model))
    assert isinstance(head, nn.Linear) and head.out_features == 3
    with torch.no_grad():
        logits = model(torch.zeros(entry.example_input))
    assert tuple(logits.shape) == (1, 3)
    blocks = discover(model)  # some registered adapter knows the family's models
    assert len(blocks) >= 2
    with pytest.raises(ModelError) as caught:
        parse_name(f"{family}:no_such_architecture_xyz")
    assert caught.value.problems[0].field == "model.name"


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_every_block_adapter_partitions_its_example_model_input_to_output(name: str) -> None:
    adapter = ADAPTERS[name]
    model = example_model(adapter.example)
    assert adapter.applies(model)
    head = classifier_name(model)
    for granularity in ("fine", "coarse"):
        blocks = discover(model, granularity)  # validate() proves the partition
        assert blocks.adapter == name
        assert [b.index for b in blocks.blocks] == list(range(len(blocks)))
        assert f"{head}.weight" in blocks.head.params
    assert len(discover(model, "coarse")) <= len(discover(model, "fine"))


def test_an_adapter_registered_by_a_user_is_tried_after_the_shipped_ones() -> None:
    class Tower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.low, self.high, self.fc = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def groups(model: nn.Module, granularity: str) -> tuple[list[tuple[str, list[str]]], list[str]]:
        names = [n for n, _ in model.named_parameters()]
        return [(b, [n for n in names if n.startswith(b)]) for b in ("low", "high")], [
            n for n in names if n.startswith("fc")
        ]

    adapter = Adapter("tower", lambda m: isinstance(m, Tower), groups, "tower")
    register_adapter(adapter)
    try:
        blocks = discover(Tower())
        assert blocks.adapter == "tower" and [b.name for b in blocks.blocks] == ["low", "high"]
        with pytest.raises(ValueError, match="already registered"):
            register_adapter(adapter)
    finally:
        del ADAPTERS["tower"]


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_is_wrapped_by_the_spike_rule_with_the_searchs_metric(name: str) -> None:
    common = {"max_t": 8, "grace_period": 2, "reduction_factor": 2.0}
    for mode in ("max", "min"):
        scheduler = make_scheduler(name, None, metric="val_acc", mode=mode, **common)
        assert isinstance(scheduler, SpikeAwareScheduler)
        assert (scheduler.metric, scheduler.mode) == ("val_acc", mode)
    with pytest.raises(ConfigError) as caught:
        make_scheduler(name, None, metric="val_acc", mode="sideways", **common)
    assert [p.field for p in caught.value.problems] == ["mode"]


def test_an_unknown_scheduler_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        make_scheduler("hyperband", None, metric="m", mode="max", max_t=4, grace_period=1,
                       reduction_factor=2.0)  # fmt: skip
    (problem,) = caught.value.problems
    assert problem.field == "pruning.scheduler"
    assert all(name in problem.fix for name in SCHEDULERS)


def test_the_export_formats_are_registered_with_a_help_and_their_options() -> None:
    assert {"unfreeze-hpo", "lightning-fts"} <= set(export.EXPORTERS)
    for name, entry in export.EXPORTERS.items():
        assert entry.name == name and entry.help and callable(entry.write)
        assert export.exporter(name) is entry
    with pytest.raises(ConfigError) as caught:
        export.exporter("onnx")
    assert all(name in caught.value.problems[0].fix for name in export.EXPORTERS)


HISTORIES = ([], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])


@pytest.mark.parametrize("name", sorted(strategies.REGISTRY))
def test_a_strategy_says_truly_whether_it_reads_the_metric_history(name: str) -> None:
    cls = strategies.REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    strategy = cls(**({"patience": 1} if "patience" in fields else {}))
    sizes = (10,) * 6
    plans = {
        tuple(strategy.plan(e, history[:e], sizes).n_trainable for e in range(7))
        for history in HISTORIES
    }
    assert (len(plans) > 1) == cls.reads_history, plans
