from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from unfreeze_hpo.errors import ConfigError
from unfreeze_hpo.search.pruning import (
    REASONS_FILE,
    SpikeAwareScheduler,
    make_scheduler,
    read_reasons,
)
from unfreeze_hpo.search.rules import SpikeRule, spike_rule_from_dict, spike_verdict
from unfreeze_hpo.signals import NEUTRAL_METRICS, SpikeMonitor

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP
RULE = SpikeRule()


def event(**spike: float) -> dict[str, float]:
    """A result one event in: block 14 opened at epoch 3, calm unless overridden."""
    return {
        **NEUTRAL_METRICS,
        "spike_events": 1.0,
        "spike_event_block": 14.0,
        "spike_event_epoch": 3.0,
        **spike,
    }


# ---------------------------------------------------------------------------------------------
# spike_verdict: a pure function of one result


def test_no_event_never_prunes_even_with_alarming_numbers() -> None:
    assert spike_verdict(dict(NEUTRAL_METRICS), RULE) is None
    alarming = {**NEUTRAL_METRICS, "spike_loss_ratio": 99.0, "spike_nonfinite": 5.0}
    assert spike_verdict(alarming, RULE) is None
    assert spike_verdict({}, RULE) is None  # nothing reported at all reads as neutral


def test_calm_event_does_not_prune() -> None:
    assert spike_verdict(event(spike_loss_ratio=1.4, spike_grad_ratio=3.0), RULE) is None


def test_loss_spike_reason_names_ratio_block_and_epoch() -> None:
    reason = spike_verdict(event(spike_loss_ratio=4.2), RULE)
    assert reason == "loss x4.2 over baseline after unfreezing block 14 at epoch 3"


def test_grad_spike_reason() -> None:
    reason = spike_verdict(event(spike_grad_ratio=80.0), RULE)
    assert reason == "grad norm x80 over baseline after unfreezing block 14 at epoch 3"


def test_nonfinite_reason_with_count_and_plural() -> None:
    many = event(spike_nonfinite=3.0, spike_event_block=2.0, spike_event_epoch=1.0)
    assert spike_verdict(many, RULE) == "3 non-finite steps after unfreezing block 2 at epoch 1"
    assert spike_verdict(event(spike_nonfinite=1.0), RULE) == (
        "1 non-finite step after unfreezing block 14 at epoch 3"
    )


def test_nonfinite_threshold_is_a_count() -> None:
    rule = SpikeRule(max_nonfinite=3)
    assert spike_verdict(event(spike_nonfinite=2.0), rule) is None
    assert spike_verdict(event(spike_nonfinite=3.0), rule) is not None


def test_values_just_under_thresholds_do_not_prune() -> None:
    under = event(
        spike_loss_ratio=2.999,
        spike_grad_ratio=49.99,
        spike_nonfinite=0.0,
        spike_recovered=0.0,
        spike_recovery_steps=19.0,  # window of 20 not yet seen in full
    )
    assert spike_verdict(under, RULE) is None
    at = event(spike_loss_ratio=3.0, spike_grad_ratio=50.0)  # "exceeds" is strict
    assert spike_verdict(at, RULE) is None


def test_no_recovery_within_full_window_prunes() -> None:
    result = event(
        spike_recovered=0.0,
        spike_recovery_steps=20.0,
        spike_event_block=3.0,
        spike_event_epoch=2.0,
    )
    assert spike_verdict(result, RULE) == (
        "loss not back under baseline within 20 steps after unfreezing block 3 at epoch 2"
    )


def test_open_window_is_not_judged_for_recovery() -> None:
    # 5 of 20 window steps seen, none back under the baseline yet: recovery is still possible.
    assert spike_verdict(event(spike_recovered=0.0, spike_recovery_steps=5.0), RULE) is None


def test_recovery_judgement_options() -> None:
    open_window = event(spike_recovered=0.0, spike_recovery_steps=10.0)
    assert spike_verdict(open_window, SpikeRule(min_window_fraction=0.5)) is not None
    assert spike_verdict(open_window, SpikeRule(window_steps=10)) is not None
    assert spike_verdict(open_window, SpikeRule(window_steps=10, require_recovery=False)) is None
    # A trial that reports its window length overrides the rule's.
    assert spike_verdict({**open_window, "spike_window_steps": 10.0}, RULE) is not None
    # 0.3 * 20 is 6.000000000000001 in floats; 6 steps are enough.
    six = event(spike_recovered=0.0, spike_recovery_steps=6.0)
    assert spike_verdict(six, SpikeRule(min_window_fraction=0.3)) is not None


def test_recovered_or_baseline_free_event_is_not_pruned() -> None:
    recovered = event(spike_recovered=1.0, spike_recovery_steps=20.0)
    assert spike_verdict(recovered, RULE) is None


def test_validation_drop_is_off_by_default() -> None:
    dropped = event(spike_val_drop=0.3)
    assert spike_verdict(dropped, RULE) is None
    assert spike_verdict(dropped, SpikeRule(max_val_drop=0.2)) == (
        "validation metric down 0.3 after unfreezing block 14 at epoch 3"
    )


def test_unknown_block_still_gives_a_reason() -> None:
    result = event(spike_loss_ratio=6.0)
    del result["spike_event_block"]
    assert spike_verdict(result, RULE) == "loss x6 over baseline after the unfreeze at epoch 3"


def test_verdict_reads_a_real_monitor() -> None:
    monitor = SpikeMonitor(baseline_steps=4, window_steps=4)
    for step in range(4):
        monitor.update(step, 1.0, 1.0)
    monitor.on_unfreeze(epoch=2, step=4, blocks=["b5"])
    monitor.update(4, 7.5, 1.0)
    result = {**monitor.metrics(), "spike_event_block": 5.0, "spike_event_epoch": 2.0}
    assert spike_verdict(result, RULE) == (
        "loss x7.5 over baseline after unfreezing block 5 at epoch 2"
    )


# ---------------------------------------------------------------------------------------------
# Config


def test_spike_rule_from_dict_coerces_and_reports_every_problem() -> None:
    rule = spike_rule_from_dict({"max_loss_ratio": "4", "require_recovery": False})
    assert rule == SpikeRule(max_loss_ratio=4.0, require_recovery=False)
    assert spike_rule_from_dict(None) == SpikeRule()
    with pytest.raises(ConfigError) as info:
        spike_rule_from_dict({"max_loss_ratio": 1.0, "max_nonfinte": 2, "min_window_fraction": 2})
    problems = {p.field: p for p in info.value.problems}
    assert set(problems) == {
        "pruning.max_loss_ratio",
        "pruning.max_nonfinte",
        "pruning.min_window_fraction",
    }
    assert "max_nonfinite" in problems["pruning.max_nonfinte"].fix


def test_make_scheduler_kinds_and_errors() -> None:
    common: dict[str, Any] = dict(
        metric="val_acc", mode="max", max_t=6, grace_period=1, reduction_factor=2
    )
    asha = make_scheduler("asha", None, **common)
    assert isinstance(asha, SpikeAwareScheduler)
    assert isinstance(asha.base, AsyncHyperBandScheduler)
    assert (asha.metric, asha.mode, asha.rule) == ("val_acc", "max", SpikeRule())
    fifo = make_scheduler("fifo", SpikeRule(max_loss_ratio=2.0), **common)
    assert isinstance(fifo, SpikeAwareScheduler)
    assert isinstance(fifo.base, FIFOScheduler)
    assert (fifo.metric, fifo.mode) == ("val_acc", "max")
    with pytest.raises(ConfigError) as info:
        make_scheduler("ahsa", None, **common)
    (problem,) = info.value.problems
    assert (problem.field, problem.fix) == ("pruning.scheduler", "did you mean asha?")
    with pytest.raises(ConfigError) as info:
        make_scheduler("asha", None, **{**common, "grace_period": 9, "reduction_factor": 1})
    fields = {p.field for p in info.value.problems}
    assert fields == {"pruning.grace_period", "pruning.reduction_factor"}
    # FIFO ignores ASHA's settings, so only the mode is wrong here.
    with pytest.raises(ConfigError) as info:
        make_scheduler("fifo", None, **{**common, "mode": "maximize", "max_t": 0})
    assert [p.field for p in info.value.problems] == ["mode"]


# ---------------------------------------------------------------------------------------------
# Scheduler decisions, driven by hand with stub trials


def trial() -> Trial:
    return Trial("__fake", stub=True)


def report(iteration: int, val_acc: float, **spike: float) -> dict[str, float]:
    base = event(**spike) if spike else dict(NEUTRAL_METRICS)
    return {**base, "training_iteration": iteration, "epoch": iteration - 1, "val_acc": val_acc}


def asha_scheduler(rule: SpikeRule | None = None) -> SpikeAwareScheduler:
    asha = AsyncHyperBandScheduler(
        metric="val_acc", mode="max", grace_period=1, max_t=10, reduction_factor=2
    )
    return SpikeAwareScheduler(rule, asha)


def test_spiking_result_stops_with_reason_without_asking_base() -> None:
    sched = asha_scheduler()
    t = trial()
    sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, t, report(1, 0.9, spike_loss_ratio=5.0)) == STOP
    assert sched.reasons == {
        t.trial_id: "loss x5 over baseline after unfreezing block 14 at epoch 3"
    }
    sched.on_trial_complete(None, t, report(1, 0.9))  # ASHA forgets the trial without error
    assert t.trial_id not in sched.base._trial_info


def test_normal_results_follow_asha_and_its_stops_get_a_reason() -> None:
    sched = asha_scheduler()
    good, better, poor = trial(), trial(), trial()
    for t in (good, better, poor):
        sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, good, report(1, 0.5)) == CONTINUE  # empty rung
    assert sched.on_trial_result(None, better, report(1, 0.9)) == CONTINUE
    assert sched.on_trial_result(None, poor, report(1, 0.1)) == STOP
    assert sched.reasons == {
        poor.trial_id: "asha: val_acc 0.1 below the rung cutoff 0.7 at epoch 0"
    }


def test_asha_stop_at_max_t_is_completion_not_pruning() -> None:
    sched = asha_scheduler()
    t = trial()
    sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, t, report(10, 0.9)) == STOP
    assert sched.reasons == {}


def test_min_mode_reason_says_above() -> None:
    asha = AsyncHyperBandScheduler(metric="val_loss", mode="min", max_t=10, reduction_factor=2)
    sched = SpikeAwareScheduler(base=asha)
    a, b = trial(), trial()
    for t in (a, b):
        sched.on_trial_add(None, t)
    sched.on_trial_result(None, a, {"training_iteration": 1, "val_loss": 0.5})
    assert sched.on_trial_result(None, b, {"training_iteration": 1, "val_loss": 2.0}) == STOP
    assert sched.reasons[b.trial_id] == (
        "asha: val_loss 2 above the rung cutoff 0.5 at iteration 1"
    )


def test_fifo_base_continues_every_normal_result() -> None:
    sched = SpikeAwareScheduler(base=FIFOScheduler())
    t = trial()
    sched.on_trial_add(None, t)
    for i, acc in enumerate([0.9, 0.1, 0.0, 0.5], start=1):
        assert sched.on_trial_result(None, t, report(i, acc, spike_loss_ratio=2.0)) == CONTINUE
    assert sched.reasons == {}


def test_search_properties_reach_asha() -> None:
    sched = SpikeAwareScheduler()  # default ASHA without metric or mode
    assert sched.set_search_properties("val_acc", "max")
    assert (sched.metric, sched.mode) == ("val_acc", "max")
    t = trial()
    sched.on_trial_add(None, t)  # ASHA raises here without metric and mode
    assert sched.on_trial_result(None, t, report(1, 0.5)) == CONTINUE


def test_same_search_properties_twice_are_no_conflict() -> None:
    common: dict[str, Any] = dict(max_t=6, grace_period=1, reduction_factor=2)
    for kind in ("asha", "fifo"):
        sched = make_scheduler(kind, None, metric="val_acc", mode="max", **common)
        assert sched.set_search_properties("val_acc", "max")  # what TuneConfig passes
        assert sched.set_search_properties(None, None)
    asha = make_scheduler("asha", None, metric="val_acc", mode="max", **common)
    assert not asha.set_search_properties("val_loss", "min")


def test_pickle_round_trip_keeps_reasons_and_state() -> None:
    sched = asha_scheduler()
    t = trial()
    sched.on_trial_add(None, t)
    sched.on_trial_result(None, t, report(1, 0.5, spike_nonfinite=2.0))
    copy = pickle.loads(pickle.dumps(sched))
    assert copy.reasons == sched.reasons and copy.reasons
    assert copy.rule == sched.rule and copy.metric == "val_acc"


def test_save_and_restore(tmp_path: Path) -> None:
    sched = asha_scheduler()
    t = trial()
    sched.on_trial_add(None, t)
    sched.on_trial_result(None, t, report(1, 0.5, spike_grad_ratio=99.0))
    sched.save(str(tmp_path / "sched.pkl"))
    fresh = asha_scheduler()
    fresh.restore(str(tmp_path / "sched.pkl"))
    assert fresh.reasons == sched.reasons


def test_reasons_file_is_written_and_merged_back_on_trial_add(tmp_path: Path) -> None:
    storage = SimpleNamespace(experiment_driver_staging_path=str(tmp_path))
    sched = SpikeAwareScheduler(base=FIFOScheduler())
    t = trial()
    t.storage = storage
    sched.on_trial_add(None, t)
    sched.on_trial_result(None, t, report(2, 0.5, spike_loss_ratio=9.0))
    assert read_reasons(tmp_path) == sched.reasons
    # A restored driver holds the scheduler as it was pickled before the run: no reasons.
    restored = SpikeAwareScheduler(base=FIFOScheduler())
    again = Trial("__fake", stub=True, trial_id=t.trial_id)
    again.storage = storage
    restored.on_trial_add(None, again)
    assert restored.reasons == sched.reasons


def test_read_reasons_tolerates_missing_and_broken_files(tmp_path: Path) -> None:
    assert read_reasons(tmp_path) == {}
    (tmp_path / REASONS_FILE).write_text("{not json")
    assert read_reasons(tmp_path) == {}


# ---------------------------------------------------------------------------------------------
# One real Ray Tune run


def _spiky_trainable(config: dict[str, Any]) -> None:
    for iteration in range(1, 7):
        spike = config["spiky"] and iteration == 3
        tune.report(
            {
                "val_acc": 0.1 * iteration,
                "spike_events": 1.0 if iteration >= 2 else 0.0,
                "spike_loss_ratio": 5.0 if spike else 1.0,
                "spike_event_block": 2.0,
                "spike_event_epoch": float(iteration - 1),
            }
        )


def test_real_search_stops_the_spiky_trial(ray_session: None, tmp_path: Path) -> None:
    scheduler = SpikeAwareScheduler(base=FIFOScheduler())
    tuner = tune.Tuner(
        _spiky_trainable,
        param_space={"spiky": tune.grid_search([False, True])},
        tune_config=tune.TuneConfig(
            scheduler=scheduler, metric="val_acc", mode="max", reuse_actors=True
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="t", verbose=0),
    )
    results = tuner.fit()
    assert not results.errors
    iterations = {r.config["spiky"]: r.metrics["training_iteration"] for r in results}
    assert iterations == {False: 6, True: 3}
    spiky_id = next(r.metrics["trial_id"] for r in results if r.config["spiky"])
    expected = {spiky_id: "loss x5 over baseline after unfreezing block 2 at epoch 2"}
    assert scheduler.reasons == expected
    # Ray syncs the reasons file with its experiment state, where a restore finds it.
    assert read_reasons(tmp_path / "t") == expected


def test_reasons_survive_a_driver_restore(ray_session: None, tmp_path: Path) -> None:
    first = tune.Tuner(
        _spiky_trainable,
        param_space={"spiky": tune.grid_search([True])},
        tune_config=tune.TuneConfig(
            scheduler=SpikeAwareScheduler(base=FIFOScheduler()), metric="val_acc", mode="max"
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="r", verbose=0),
    ).fit()
    # Ray pickles the scheduler into tuner.pkl once, before the run, and never checkpoints it:
    # the restored driver starts from that empty copy and must find the reasons on disk.
    restored = tune.Tuner.restore(str(tmp_path / "r"), trainable=_spiky_trainable)
    restored.fit()
    scheduler = restored._local_tuner._tune_config.scheduler  # no public accessor
    assert scheduler.reasons == {
        first[0].metrics["trial_id"]: "loss x5 over baseline after unfreezing block 2 at epoch 2"
    }


# ---------------------------------------------------------------------------------------------
# The phase grace: no rung stops a schedule whose backbone is still frozen


def phased(epoch: int, val_acc: float, start: int) -> dict[str, float]:
    """A result of a schedule whose fine-tuning phase starts at epoch ``start``."""
    return {**report(epoch + 1, val_acc), "phase_epochs": float(max(0, epoch + 1 - start))}


@pytest.mark.parametrize(("phase_grace", "late_stopped"), [(1, False), (0, True)])
def test_a_late_unfreezer_is_not_stopped_at_a_rung_before_its_first_event(
    phase_grace: int, late_stopped: bool
) -> None:
    common: dict[str, Any] = dict(max_t=10, grace_period=1, reduction_factor=2)
    sched = make_scheduler(
        "asha", None, metric="val_acc", mode="max", **common, phase_grace=phase_grace
    )
    early, late, later = trial(), trial(), trial()
    for t in (early, late, later):
        sched.on_trial_add(None, t)
    # A schedule that fine-tunes from epoch 0 reaches the first rung.
    assert sched.on_trial_result(None, early, phased(0, 0.9, start=0)) == CONTINUE
    # One that trains its head alone until epoch 3: low accuracy at the rung, below the cutoff.
    decision = sched.on_trial_result(None, late, phased(0, 0.1, start=3))
    if late_stopped:  # plain ASHA judges it before its backbone has trained at all
        assert decision == STOP
        assert "below the rung cutoff 0.9 at epoch 0" in sched.reasons[late.trial_id]
        return
    assert decision == CONTINUE and sched.reasons == {}
    # Its value still counts at the rung: a third trial meets the cutoff it lowered.
    assert sched.on_trial_result(None, later, phased(0, 0.5, start=0)) == CONTINUE
    # In its phase it is judged at the next rung it reaches (epoch 3), like any other trial.
    for epoch in (1, 2, 3):
        assert sched.on_trial_result(None, early, phased(epoch, 0.95, start=0)) == CONTINUE
    for epoch in (1, 2):  # a rung at epoch 1 too, still before its phase
        assert sched.on_trial_result(None, late, phased(epoch, 0.1, start=3)) == CONTINUE
    assert sched.on_trial_result(None, late, phased(3, 0.2, start=3)) == STOP
    assert "below the rung cutoff" in sched.reasons[late.trial_id]


def test_the_phase_grace_is_a_checked_option() -> None:
    common: dict[str, Any] = dict(max_t=6, grace_period=1, reduction_factor=2)
    with pytest.raises(ConfigError) as info:
        make_scheduler("asha", None, metric="val_acc", mode="max", **common, phase_grace=-1)
    (problem,) = info.value.problems
    assert problem.field == "pruning.phase_grace"
    assert make_scheduler("asha", None, metric="val_acc", mode="max", **common).phase_grace == 1
