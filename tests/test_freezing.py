from __future__ import annotations

import copy
import json
import math
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from unfreeze_hpo.blocks import Blocks, discover
from unfreeze_hpo.errors import AuditError, ConfigError
from unfreeze_hpo.freezing import Freezer, build_optimizer, no_decay_names
from unfreeze_hpo.models import ModelSpec, build
from unfreeze_hpo.strategies import Plan, create, lr_scales

NUM_CLASSES = 4
HEAD_PREFIX = "blocks.5."  # resnet3d_tiny: stem, four stages, then the head
ADAMW = ("adamw", {"weight_decay": 0.1})
SGD = ("sgd", {"momentum": 0.9, "weight_decay": 0.1})


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8))
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8, affine=False)) for _ in range(3)
        )
        self.head = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


TINY_MATCHER = {"stem": r"^stem", "blocks": r"^layers\.(\d+)"}


@pytest.fixture(scope="module")
def template() -> nn.Module:
    torch.manual_seed(0)
    return build(ModelSpec("pytorchvideo:resnet3d_tiny", num_classes=NUM_CLASSES))


@pytest.fixture
def model(template: nn.Module) -> nn.Module:
    return copy.deepcopy(template)


@pytest.fixture
def blocks(model: nn.Module) -> Blocks:
    return discover(model)


def tiny() -> tuple[nn.Module, Blocks]:
    torch.manual_seed(0)
    model = Tiny()
    return model, discover(model, matcher=TINY_MATCHER)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 4, 32, 32, generator=gen)
    return x, torch.randint(0, NUM_CLASSES, (4,), generator=gen)


def backward(model: nn.Module, seed: int) -> None:
    x, y = batch(seed)
    nn.functional.cross_entropy(model(x), y).backward()


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    for i in range(steps):
        backward(model, seed + i)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def last(blocks: Blocks, k: int, epoch: int = 0, **scales: float) -> Plan:
    return Plan(epoch, k, lr_scales(len(blocks), k, **scales))


def params_of(model: nn.Module, names: tuple[str, ...]) -> list[nn.Parameter]:
    params = dict(model.named_parameters())
    return [params[n] for n in names]


def freezer_for(
    model: nn.Module,
    blocks: Blocks,
    opt: tuple[str, dict[str, Any]] = ADAMW,
    base_lr: Callable[[int], float] = lambda step: 1e-2,
    **kwargs: Any,
) -> Freezer:
    name, options = opt
    return Freezer(
        model, blocks, build_optimizer(model, blocks, name, **options), base_lr, **kwargs
    )


def cosine(total: int, peak: float = 1e-2) -> Callable[[int], float]:
    return lambda step: 0.5 * peak * (1 + math.cos(math.pi * step / total))


def norms_by_block(model: nn.Module, blocks: Blocks) -> dict[int, list[nn.Module]]:
    found: dict[int, list[nn.Module]] = {b.index: [] for b in blocks.blocks}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            owners = [b.index for b in blocks.blocks if name.startswith(b.name + ".")]
            assert len(owners) == 1, name
            found[owners[0]].append(module)
    return found


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


@pytest.mark.parametrize("opt", [ADAMW, SGD], ids=["adamw", "sgd"])
@pytest.mark.parametrize("which", ["resnet3d_tiny", "regex"])
def test_optimizer_has_a_decay_and_a_no_decay_group_per_block_and_head(
    which: str, opt: tuple[str, dict[str, Any]], template: nn.Module
) -> None:
    model, blocks = tiny() if which == "regex" else (template, discover(template))
    name, options = opt
    optimizer = build_optimizer(model, blocks, name, **options)
    excluded = no_decay_names(model)

    groups = optimizer.param_groups
    assert [g["name"] for g in groups if g["decay"]] == [b.name for b in blocks.blocks] + ["head"]
    for part in (*blocks.blocks, blocks.head):
        pair = [g for g in groups if g["name"] == part.name]
        assert [g["decay"] for g in pair] == [True, False][: len(pair)]
        members = {id(p) for g in pair for p in g["params"]}
        assert members == {id(p) for p in params_of(model, part.params)}
        for group in pair:
            names = {
                n
                for n in part.params
                if id(dict(model.named_parameters())[n]) in {id(p) for p in group["params"]}
            }
            assert names.isdisjoint(excluded) if group["decay"] else names <= excluded
            assert group["lr"] == 0.0
            wd = options.get("weight_decay", 0.0) if group["decay"] else 0.0
            assert group["weight_decay"] == wd
            assert all(group[k] == v for k, v in options.items() if k != "weight_decay")
    counts = Counter(id(p) for g in groups for p in g["params"])
    assert counts == Counter(id(p) for p in model.parameters())
    assert set(counts.values()) == {1}


def test_no_decay_follows_timm_on_a_vit_norms_biases_pos_embed_and_cls_token() -> None:
    import timm
    from timm.optim import param_groups_weight_decay

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, depth=2)
    ours = no_decay_names(vit)
    names = {id(p): n for n, p in vit.named_parameters()}
    groups = param_groups_weight_decay(vit, 0.05, no_weight_decay_list=vit.no_weight_decay())
    theirs = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert ours == theirs
    assert {"pos_embed", "cls_token", "blocks.0.norm1.weight", "head.bias"} <= ours
    assert "blocks.0.attn.qkv.weight" not in ours and "head.weight" not in ours


def test_a_blocks_decay_and_no_decay_groups_share_its_lr(model: nn.Module, blocks: Blocks) -> None:
    freezer = freezer_for(model, blocks, ADAMW)
    freezer.apply(last(blocks, 2), step=3)
    by_name: dict[str, set[float]] = {}
    for group in freezer.optimizer.param_groups:
        by_name.setdefault(group["name"], set()).add(group["lr"])
    assert all(len(lrs) == 1 for lrs in by_name.values())
    assert freezer.lrs() == {name: lrs.pop() for name, lrs in by_name.items()}
    assert sum(g["decay"] is False for g in freezer.optimizer.param_groups) > 1


def test_optimizer_rejects_unknown_name_and_bad_arguments(model: nn.Module, blocks: Blocks) -> None:
    with pytest.raises(ConfigError) as unknown:
        build_optimizer(model, blocks, "lamb")
    assert [(p.field, p.value) for p in unknown.value.problems] == [("optimizer.name", "lamb")]
    assert "adamw" in str(unknown.value)

    for name, options in [("sgd", {"momentum": -1.0}), ("adamw", {"betas_typo": (0.9, 0.99)})]:
        with pytest.raises(ConfigError, match=name):
            build_optimizer(model, blocks, name, **options)


@pytest.mark.parametrize("opt", [ADAMW, SGD], ids=["adamw", "sgd"])
def test_frozen_blocks_do_not_move_and_hold_no_optimizer_state(
    opt: tuple[str, dict[str, Any]], model: nn.Module, blocks: Blocks
) -> None:
    backward(model, seed=99)  # stale gradients on every parameter from before freezing
    freezer = freezer_for(model, blocks, opt)
    freezer.apply(last(blocks, 2), step=0)
    freezer.train()

    frozen = [p for b in blocks.blocks[:-2] for p in params_of(model, b.params)]
    trainable = [p for p in model.parameters() if all(p is not q for q in frozen)]
    assert len(frozen) + len(trainable) == len(list(model.parameters()))
    before = {id(p): p.detach().clone() for p in model.parameters()}

    for step in range(3):
        backward(model, seed=step)
        assert all(p.grad is None for p in frozen)
        assert all(p.grad is not None for p in trainable)
        freezer.optimizer.step()
        freezer.optimizer.zero_grad(set_to_none=True)

    state = freezer.optimizer.state
    assert {id(p) for p in state} == {id(p) for p in trainable}
    assert all(state[p] for p in trainable)
    assert all(torch.equal(p, before[id(p)]) and p.grad is None for p in frozen)
    assert all(not torch.equal(p, before[id(p)]) for p in trainable)


def test_growing_plans_keep_optimizer_and_its_state(model: nn.Module, blocks: Blocks) -> None:
    freezer = freezer_for(model, blocks)
    optimizer = freezer.optimizer
    groups = [id(g) for g in optimizer.param_groups]
    strategy = create("early_gradual", {"freeze_epochs": 0, "target_ratio": 1.0})
    names = [b.name for b in blocks.blocks]
    head = params_of(model, blocks.head.params)
    by_block = [params_of(model, b.params) for b in blocks.blocks]

    def steps(p: nn.Parameter) -> int | None:
        return int(optimizer.state[p]["step"]) if p in optimizer.state else None

    assert freezer.apply(strategy.plan(0, [], blocks.sizes), step=0) == [names[4]]
    train(model, optimizer, 2)
    assert {steps(p) for p in head + by_block[4]} == {2}
    assert {steps(p) for p in by_block[3]} == {None}
    exp_avg = {id(p): optimizer.state[p]["exp_avg"].clone() for p in by_block[4]}

    assert freezer.apply(strategy.plan(1, [], blocks.sizes), step=2) == [names[3]]
    assert freezer.optimizer is optimizer
    assert [id(g) for g in optimizer.param_groups] == groups
    assert {steps(p) for p in head + by_block[4]} == {2}
    assert all(torch.equal(optimizer.state[p]["exp_avg"], exp_avg[id(p)]) for p in by_block[4])
    assert {steps(p) for p in by_block[3]} == {None}

    train(model, optimizer, 2, seed=2)
    assert {steps(p) for p in head + by_block[4]} == {4}
    assert {steps(p) for p in by_block[3]} == {2}
    assert {steps(p) for p in by_block[2]} == {None}

    assert freezer.apply(strategy.plan(2, [], blocks.sizes), step=4) == [names[2]]
    assert freezer.apply(strategy.plan(2, [], blocks.sizes), step=4) == []


def test_group_lrs_follow_base_lr_and_plan_scales(model: nn.Module, blocks: Blocks) -> None:
    base = cosine(20)
    freezer = freezer_for(model, blocks, base_lr=base)
    strategy = create("early_gradual", {"freeze_epochs": 0, "target_ratio": 1.0})
    plan = strategy.plan(2, [], blocks.sizes, backbone_lr_mult=0.1, layer_decay=0.5)
    assert plan.n_trainable == 3
    expected_scales = [0.0, 0.0, 0.1 * 0.25, 0.1 * 0.5, 0.1]

    freezer.apply(plan, step=5)
    for step in range(5, 12):
        if step > 5:
            freezer.set_lr(step)
        lrs = freezer.lrs()
        assert list(lrs) == [b.name for b in blocks.blocks] + ["head"]
        assert lrs["head"] == base(step)
        for i, block in enumerate(blocks.blocks):
            assert lrs[block.name] == pytest.approx(base(step) * plan.lr_scales[i], rel=1e-12)
            assert lrs[block.name] == pytest.approx(base(step) * expected_scales[i], rel=1e-12)
        assert [lrs[b.name] for b in blocks.blocks[:2]] == [0.0, 0.0]


def test_warmup_ramps_blocks_unfrozen_by_events_only(model: nn.Module, blocks: Blocks) -> None:
    base = cosine(20)
    freezer = freezer_for(model, blocks, base_lr=base, warmup_steps=4)
    names = [b.name for b in blocks.blocks]
    events = {0: last(blocks, 2, epoch=0), 3: last(blocks, 3, epoch=1), 5: last(blocks, 4, epoch=2)}
    unfrozen_at = {4: None, 3: None, 2: 3, 1: 5}

    for step in range(12):
        if step in events:
            freezer.apply(events[step], step)
        else:
            freezer.set_lr(step)
        plan = freezer.plan
        assert plan is not None
        lrs = freezer.lrs()
        assert lrs["head"] == base(step)
        for i, name in enumerate(names):
            start = unfrozen_at.get(i)
            factor = 1.0 if start is None else min(1.0, (step - start + 1) / 4)
            expected = base(step) * plan.lr_scales[i] * factor if plan.is_trainable(i) else 0.0
            assert lrs[name] == pytest.approx(expected, rel=1e-12, abs=0.0), (step, name)
    assert [freezer.lrs()[n] for n in names[1:]] == [base(11)] * 4


def snapshot(model: nn.Module, freezer: Freezer) -> dict[str, Any]:
    return {
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "lrs": freezer.lrs(),
        "training": {n: m.training for n, m in model.named_modules()},
        "optimizer": copy.deepcopy(freezer.optimizer.state_dict()),
        "freezer": copy.deepcopy(freezer.state_dict()),
    }


def test_applying_the_same_plan_twice_changes_nothing(model: nn.Module, blocks: Blocks) -> None:
    freezer = freezer_for(model, blocks, warmup_steps=4)
    freezer.apply(last(blocks, 1, epoch=0), step=0)
    freezer.train()
    train(model, freezer.optimizer, 2)
    plan = last(blocks, 2, epoch=1)
    freezer.apply(plan, step=3)
    freezer.train()
    train(model, freezer.optimizer, 2, seed=3)

    before = snapshot(model, freezer)
    assert before["freezer"]["unfrozen_at"]
    assert freezer.apply(plan, step=3) == []
    after = snapshot(model, freezer)
    for key in before:
        assert same(before[key], after[key]), key


@pytest.mark.parametrize("frozen_norm_eval", [True, False])
def test_norm_layers_of_frozen_blocks_keep_running_stats(
    frozen_norm_eval: bool, model: nn.Module, blocks: Blocks
) -> None:
    norms = norms_by_block(model, blocks)
    assert all(norms.values())
    freezer = freezer_for(model, blocks, frozen_norm_eval=frozen_norm_eval)
    model.eval()
    freezer.apply(last(blocks, 2), step=0)
    freezer.train()

    stats = {id(m): m.running_mean.clone() for ms in norms.values() for m in ms}
    with torch.no_grad():
        model(batch(0)[0])
    for i, layers in norms.items():
        kept = frozen_norm_eval and i < 3
        for layer in layers:
            assert layer.training is not kept
            assert torch.equal(layer.running_mean, stats[id(layer)]) is kept

    model.eval()
    freezer.train()
    freezer.apply(last(blocks, 3), step=1)
    assert [all(m.training for m in norms[i]) for i in range(5)] == [
        not frozen_norm_eval,
        not frozen_norm_eval,
        True,
        True,
        True,
    ]


def test_with_unfrozen_norm_eval_every_backbone_norm_keeps_its_running_stats(
    model: nn.Module, blocks: Blocks
) -> None:
    norms = norms_by_block(model, blocks)
    freezer = freezer_for(model, blocks, unfrozen_norm_eval=True)
    freezer.apply(last(blocks, 2), step=0)
    freezer.train()
    stats = {id(m): m.running_mean.clone() for ms in norms.values() for m in ms}
    model(batch(0)[0]).sum().backward()
    for i, layers in norms.items():
        for layer in layers:
            assert not layer.training, i
            assert torch.equal(layer.running_mean, stats[id(layer)]), i
            if i >= 3 and layer.weight is not None:  # trainable blocks: the affine still trains
                assert layer.weight.grad is not None


def test_norm_layers_without_parameters_follow_their_block() -> None:
    model, blocks = tiny()
    optimizer = build_optimizer(model, blocks)
    freezer = Freezer(model, blocks, optimizer, lambda step: 1e-2)
    freezer.apply(Plan(0, 1, lr_scales(len(blocks), 1)), step=0)
    freezer.train()
    modes = {n: m.training for n, m in model.named_modules() if isinstance(m, nn.BatchNorm1d)}
    assert modes == {
        "stem.1": False,
        "layers.0.1": False,
        "layers.1.1": False,
        "layers.2.1": True,
    }


def test_status_counts_match_the_parameters(model: nn.Module, blocks: Blocks) -> None:
    freezer = freezer_for(model, blocks)
    freezer.apply(last(blocks, 0), step=0)
    assert freezer.status().unfrozen == ()
    assert "unfrozen blocks: none" in freezer.status().line(0)

    freezer.apply(last(blocks, 2, epoch=1), step=3)
    named = list(model.named_parameters())
    total = sum(p.numel() for _, p in named)
    head = sum(p.numel() for n, p in named if n.startswith(HEAD_PREFIX))
    trainable = sum(p.numel() for _, p in named if p.requires_grad)
    backbone_trainable = sum(
        p.numel() for n, p in named if p.requires_grad and not n.startswith(HEAD_PREFIX)
    )
    late = sum(p.numel() for n, p in named if n.startswith(("blocks.3.", "blocks.4.")))
    assert backbone_trainable == late

    status = freezer.status()
    assert (status.total, status.head, status.backbone) == (total, head, total - head)
    assert (status.trainable, status.frozen) == (trainable, total - trainable)
    assert (status.backbone_trainable, status.head_trainable) == (backbone_trainable, head)
    assert status.unfrozen == ("blocks.3.res_blocks.0", "blocks.4.res_blocks.0")

    line = status.line(7)
    assert total > 1000
    for part in [
        "epoch 7",
        f"{trainable:,}/{total:,} trainable ({100 * trainable / total:.1f}%)",
        f"backbone {backbone_trainable:,}/{total - head:,} "
        f"({100 * backbone_trainable / (total - head):.1f}%)",
        f"head {head:,}/{head:,}",
        f"frozen {total - trainable:,} ({100 * (total - trainable) / total:.1f}%)",
        "blocks.3.res_blocks.0, blocks.4.res_blocks.0",
    ]:
        assert part in line


def test_first_plan_overrides_flags_set_before_the_freezer(
    model: nn.Module, blocks: Blocks
) -> None:
    model.requires_grad_(False)
    freezer = freezer_for(model, blocks)
    freezer.apply(last(blocks, 2), step=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for part in (*blocks.blocks[3:], blocks.head) for n in part.params}
    freezer.audit()


def test_audit_catches_a_frozen_parameter_unfrozen_behind_the_plan(
    model: nn.Module, blocks: Blocks
) -> None:
    freezer = freezer_for(model, blocks)
    plan = last(blocks, 2)
    freezer.apply(plan, step=0)
    freezer.audit()
    name = blocks.blocks[2].params[0]
    flipped = dict(model.named_parameters())[name]
    flipped.requires_grad_(True)

    with pytest.raises(AuditError, match=re.escape(name)):
        freezer.audit()
    with pytest.raises(AuditError, match=re.escape(name)):
        freezer.apply(last(blocks, 3, epoch=1), step=3)
    assert freezer.plan == plan
    assert flipped.requires_grad
    assert not any(p.requires_grad for p in params_of(model, blocks.blocks[2].params[1:]))
    assert freezer.status().trainable > sum(blocks.sizes[3:]) + blocks.head.numel


def test_audit_catches_a_frozen_head_parameter(model: nn.Module, blocks: Blocks) -> None:
    freezer = freezer_for(model, blocks)
    freezer.apply(last(blocks, 1), step=0)
    name = blocks.head.params[-1]
    dict(model.named_parameters())[name].requires_grad_(False)
    with pytest.raises(AuditError, match=re.escape(name)):
        freezer.audit()
    with pytest.raises(AuditError, match=re.escape(name)):
        freezer.apply(last(blocks, 1), step=0)


STEPS_PER_EPOCH = 3
RESUME_STRATEGY = {"freeze_epochs": 1, "target_ratio": 1.0}


def run_epochs(freezer: Freezer, blocks: Blocks, epochs: range) -> list[tuple[Any, ...]]:
    strategy = create("early_gradual", RESUME_STRATEGY)
    record = []
    for epoch in epochs:
        plan = strategy.plan(epoch, [], blocks.sizes, backbone_lr_mult=0.5, layer_decay=0.8)
        newly = freezer.apply(plan, epoch * STEPS_PER_EPOCH)
        freezer.train()
        for i in range(STEPS_PER_EPOCH):
            step = epoch * STEPS_PER_EPOCH + i
            freezer.set_lr(step)
            grads = tuple(p.requires_grad for p in freezer.model.parameters())
            record.append((step, newly, freezer.lrs(), grads))
    return record


def resumed(template: nn.Module, state: dict[str, Any], warmup: int) -> tuple[Freezer, Blocks]:
    model = copy.deepcopy(template)
    blocks = discover(model)
    freezer = freezer_for(model, blocks, base_lr=cosine(18), warmup_steps=warmup)
    freezer.load_state_dict(json.loads(json.dumps(state)))
    return freezer, blocks


def test_resumed_run_matches_uninterrupted_run(template: nn.Module) -> None:
    model_a = copy.deepcopy(template)
    blocks_a = discover(model_a)
    a = run_epochs(
        freezer_for(model_a, blocks_a, base_lr=cosine(18), warmup_steps=5), blocks_a, range(6)
    )
    assert [r[1] for r in a[::STEPS_PER_EPOCH]] == [[]] + [[b.name] for b in blocks_a.blocks[::-1]]

    model_b = copy.deepcopy(template)
    blocks_b = discover(model_b)
    freezer_b = freezer_for(model_b, blocks_b, base_lr=cosine(18), warmup_steps=5)
    first = run_epochs(freezer_b, blocks_b, range(3))
    assert first == a[:9]
    state = freezer_b.state_dict()
    assert state["unfrozen_at"] == {"4": 3, "3": 6}

    freezer_c, blocks_c = resumed(template, state, warmup=5)
    assert freezer_c.state_dict() == state
    rest = run_epochs(freezer_c, blocks_c, range(3, 6))
    assert rest == a[9:]
    mid_warmup = a[9][2][blocks_a.blocks[3].name]
    assert mid_warmup == pytest.approx(cosine(18)(9) * 0.5 * 0.8 * (9 - 6 + 1) / 5, rel=1e-12)


def test_lrs_right_after_resume_match_the_saved_point(template: nn.Module) -> None:
    model = copy.deepcopy(template)
    blocks = discover(model)
    freezer = freezer_for(model, blocks, base_lr=cosine(18), warmup_steps=5)
    run_epochs(freezer, blocks, range(3))
    state = freezer.state_dict()
    freezer.set_lr(state["step"])
    saved = freezer.lrs()

    loaded, _ = resumed(template, state, warmup=5)
    assert loaded.lrs() == saved


def test_plan_for_another_block_count_is_rejected(model: nn.Module, blocks: Blocks) -> None:
    freezer = freezer_for(model, blocks)
    for n_blocks in (len(blocks) - 1, len(blocks) + 4):
        with pytest.raises(ConfigError) as error:
            freezer.apply(Plan(0, 1, lr_scales(n_blocks, 1)), step=0)
        assert error.value.problems[0].field == "plan"
    assert freezer.plan is None
    assert all(p.requires_grad for p in model.parameters())

    plan = last(blocks, 1)
    freezer.apply(plan, step=0)
    with pytest.raises(ConfigError):
        freezer.apply(Plan(1, 2, lr_scales(len(blocks) + 1, 2)), step=3)
    assert freezer.plan == plan


def test_negative_warmup_is_rejected(model: nn.Module, blocks: Blocks) -> None:
    with pytest.raises(ConfigError, match="unfreeze_warmup_steps"):
        freezer_for(model, blocks, warmup_steps=-1)
