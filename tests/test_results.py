"""Reading a search: the trials table, the best trials, export and replay of a schedule, and the
``trials``/``best``/``export`` commands, on one tiny real search (plus one synthetic failed trial).
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pandas as pd
import pytest
import yaml
from nothing_lost import assert_nothing_lost
from support import SPIKY_SPACE, TINY_BASE, run, write

from unfreeze_hpo import config, results, train, trialdir, yamlfile
from unfreeze_hpo.results import export, listing
from unfreeze_hpo.search import inputs
from unfreeze_hpo.search.driver import run_search
from unfreeze_hpo.search.inputs import load_inputs
from unfreeze_hpo.search.objective import Objective
from unfreeze_hpo.search.options import STUDY_FILE, SearchConfig
from unfreeze_hpo.search.rules import SpikeRule
from unfreeze_hpo.search.space import load_space

State = optuna.trial.TrialState

FAIL_REASON = "TrialFailed: diverged at epoch 0, step 3: 2 consecutive steps with non-finite loss"
HYPERPARAMETERS = ["optimizer.backbone_lr_mult", "early_gradual.target_ratio"]
KEY = Objective().key  # the default objective's: the mean of val_acc over the last 3 epochs


@pytest.fixture(scope="module")
def searched(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("results")
    base = write(folder / "base.yaml", TINY_BASE)
    space = write(folder / "spiky.yaml", SPIKY_SPACE)
    cfg = SearchConfig(
        name="tiny",
        storage_path=str(folder / "runs"),
        base=str(base),
        space=str(space),
        num_trials=5,
        max_concurrent=2,
        cpus_per_trial=1,
        scheduler="fifo",
        pruning=SpikeRule(max_loss_ratio=1.3),
        preflight=False,
        reseed_top=1,  # the best config once more, with seed 1
        reseed_seeds=1,
    )
    run_search(cfg, log=lambda _: None)
    study = optuna.load_study(study_name=cfg.name, storage=cfg.study_url)
    add_failed_trial(study, load_space(space).distributions())
    return SimpleNamespace(cfg=cfg, folder=cfg.folder, study=study, space_file=space)


def add_failed_trial(study: optuna.Study, distributions: dict[str, Any]) -> None:
    """A trial as StudyRecorder writes one that raised (a diverging branch costs a whole run)."""
    params = {"strategy": "fixed", "optimizer.backbone_lr_mult": 45.0}
    config_values = {**params, "fixed.phases": [[0, 0], [2, 5]], "optimizer.lr": 3e-2}
    study.add_trial(
        optuna.trial.create_trial(
            state=State.FAIL,
            params=params,
            distributions={k: distributions[k] for k in params},
            user_attrs={
                "ray_trial_id": "synthetic",
                "status": "fail",
                "reason": FAIL_REASON,
                "config": config_values,
                "final": {},
                "trial_dir": "",
                "timeline": [],
            },
        )
    )


@pytest.fixture(scope="module")
def search(searched: SimpleNamespace) -> results.Search:
    return results.open_search(searched.folder)


def trials_of(searched: SimpleNamespace) -> list[optuna.trial.FrozenTrial]:
    return searched.study.get_trials()


def best_complete(searched: SimpleNamespace) -> optuna.trial.FrozenTrial:
    complete = [t for t in trials_of(searched) if t.state == State.COMPLETE]
    assert complete
    return max(complete, key=lambda t: (t.value, -t.number))


# ---------------------------------------------------------------------------------------------
# Opening a search


def test_open_search_reads_back_what_the_search_ran_with(
    searched: SimpleNamespace, search: results.Search
) -> None:
    assert (searched.folder / inputs.SEARCH_FILE).is_file()
    assert search.name == "tiny"
    assert (search.metric, search.mode) == ("last3_mean_val_acc", "max")
    assert search.study.user_attrs["objective"]["describe"] == search.objective.describe()
    assert search.base == config.from_dict(yamlfile.parse_yaml(TINY_BASE)[0])
    original = load_space(searched.space_file)
    assert search.space.strategies == original.strategies
    assert search.space.distributions() == original.distributions()
    assert search.space.per_strategy == original.per_strategy
    assert search.space.common == original.common


def test_unknown_folder_and_non_searches_are_user_errors(
    tmp_path: Path, searched: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = searched.folder.parent
    for argv in (
        ["trials", str(runs / "nope")],
        ["best", str(runs)],
        ["export", str(runs / "nope"), "--out", str(tmp_path / "x.yaml")],
    ):
        code, out, err = run(capsys, *argv)
        assert code == 2, argv
        assert "SEARCH" in err and "fix:" in err
        assert "Traceback" not in out + err
    _, _, err = run(capsys, "trials", str(runs / "nope"))
    assert "no such folder" in err and "searches in" in err and "tiny" in err
    assert not (tmp_path / "x.yaml").exists()

    started = tmp_path / "started"  # a folder with the record but no study yet
    started.mkdir()
    shutil.copy(searched.folder / inputs.SEARCH_FILE, started)
    code, _, err = run(capsys, "trials", str(started))
    assert code == 2 and "no study yet" in err
    assert not (started / STUDY_FILE).exists(), "a reader must not create the study"


# ---------------------------------------------------------------------------------------------
# trials


def test_trials_table_has_one_row_per_trial_with_state_params_metrics_and_reason(
    searched: SimpleNamespace, search: results.Search
) -> None:
    trials = trials_of(searched)
    table = listing.trials_table(search)
    assert list(table["number"]) == [t.number for t in trials]
    assert {"number", "state", "strategy", *HYPERPARAMETERS, "value", "final", "reason"} <= set(
        table.columns
    )
    names = {State.COMPLETE: "complete", State.PRUNED: "pruned", State.FAIL: "failed"}
    assert list(table["state"]) == [names[t.state] for t in trials]
    assert {"complete", "pruned", "failed"} <= set(table["state"])
    for t, row in zip(trials, table.to_dict(orient="records"), strict=True):
        assert row["strategy"] == t.params["strategy"]
        for name in HYPERPARAMETERS:
            if name in t.params:
                assert row[name] == t.params[name]
            else:
                assert pd.isna(row[name])  # not in this trial's branch
        final = t.user_attrs["final"]
        if t.state == State.FAIL:
            assert pd.isna(row["value"]) and pd.isna(row["epochs"])
        else:
            assert row["value"] == t.value
            assert row["final"] == final["val_acc"]  # the metric the objective is made of
            assert row["epochs"] == final["epoch"] + 1
            assert row["trainable_ratio"] == final["backbone_trainable_ratio"]
            assert row["worst_spike"] == final["spike_worst_loss_ratio"]
        if t.state == State.COMPLETE:
            assert pd.isna(row["reason"])
        else:
            assert row["reason"] == t.user_attrs["reason"]
    pruned = table[table["state"] == "pruned"]
    assert all(r.startswith("loss x") for r in pruned["reason"])
    assert table.loc[table["state"] == "failed", "reason"].tolist() == [FAIL_REASON]


def test_trials_of_ray_not_yet_in_the_study_are_running(
    tmp_path: Path, searched: SimpleNamespace
) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (inputs.SEARCH_FILE, STUDY_FILE):
        shutil.copy(searched.folder / name, copy)
    trial_dir = copy / "ray" / "run_trial_0badf00d_9_strategy=fixed_2026-01-01_00-00-00"
    trial_dir.mkdir(parents=True)
    params = {"strategy": "fixed", "optimizer.backbone_lr_mult": 2.0, "optimizer.lr": 0.03}
    write(trial_dir / "params.json", json.dumps(params))
    reports = [
        {"trial_id": "0badf00d", "epoch": 0.0, KEY: 0.25, "spike_worst_loss_ratio": 1.0},
        {"trial_id": "0badf00d", "epoch": 1.0, KEY: 0.5, "spike_worst_loss_ratio": 1.2},
    ]
    lines = [json.dumps(r) for r in reports]
    write(trial_dir / "result.json", "\n".join(lines) + '\n{"trial_id": "0badf')  # mid-write

    table = listing.trials_table(results.open_search(copy))
    assert len(table) == len(trials_of(searched)) + 1
    (row,) = table[table["state"] == "running"].to_dict(orient="records")
    assert pd.isna(row["number"])
    assert row["ray_trial_id"] == "0badf00d"
    assert (row["strategy"], row["optimizer.backbone_lr_mult"]) == ("fixed", 2.0)
    assert (row["value"], row["epochs"], row["worst_spike"]) == (0.5, 2, 1.2)
    assert "not in the study yet" in row["reason"]


def test_trials_command_filters_sorts_and_formats(
    searched: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = str(searched.folder)
    trials = trials_of(searched)

    code, out, _ = run(capsys, "trials", folder)
    assert code == 0
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 120  # fits a terminal
    header = lines[2].split()
    assert header[:3] == ["number", "state", "strategy"]
    assert {"backbone_lr_mult", "target_ratio", "value", "reason"} <= set(header)  # short names
    assert "early_gradual.target_ratio" not in header
    assert FAIL_REASON[:20] in out and "more column(s):" in out and "--wide shows" in out
    assert "None" not in out  # a missing reason or value shows as "-"

    code, out, _ = run(capsys, "trials", folder, "--wide")
    assert code == 0
    assert "worst_spike" in out and "ray_trial_id" in out and FAIL_REASON in out
    assert "more column(s)" not in out

    code, out, _ = run(capsys, "trials", folder, "--columns", "number,early_gradual.target_ratio")
    assert code == 0
    assert out.splitlines()[2].split() == ["number", "target_ratio"]
    code, _, err = run(capsys, "best", folder, "--columns", "number,nope", "--format", "csv")
    assert code == 2 and "--columns: " in err and "number,nope" in err and "target_ratio" in err

    code, out, _ = run(capsys, "trials", folder, "--state", "pruned", "--format", "csv")
    assert code == 0
    pruned = pd.read_csv(io.StringIO(out))
    assert sorted(pruned["number"]) == [t.number for t in trials if t.state == State.PRUNED]
    assert set(pruned["state"]) == {"pruned"}
    assert pruned["reason"].str.startswith("loss x").all()

    argv = ["--strategy", "early_gradual", "--sort", "value", "--desc", "--format", "json"]
    code, out, _ = run(capsys, "trials", folder, *argv)
    assert code == 0
    rows = json.loads(out)
    gentle = [t for t in trials if t.params["strategy"] == "early_gradual"]
    assert sorted(r["number"] for r in rows) == sorted(t.number for t in gentle)
    values = [r["value"] for r in rows]
    assert values == sorted(values, reverse=True)
    assert all(r["early_gradual.target_ratio"] is not None for r in rows)

    code, out, _ = run(capsys, "trials", folder, "--state", "failed", "--format", "json")
    (failed,) = json.loads(out)
    assert failed["reason"] == FAIL_REASON
    assert failed["value"] is None and failed["early_gradual.target_ratio"] is None


def test_trials_command_reports_every_bad_option_at_once(
    searched: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--state", "done", "--strategy", "full", "--sort", "acc", "--format", "xml"]
    code, out, err = run(capsys, "trials", str(searched.folder), *argv)
    assert code == 2
    assert out == "" and "Traceback" not in err
    for field in ("--state", "--strategy", "--sort", "--format"):
        assert f"{field}:" in err
    assert "use one of complete, pruned, failed or running" in err
    assert "use fixed or early_gradual" in err


# ---------------------------------------------------------------------------------------------
# best


def test_best_trials_against_the_study(searched: SimpleNamespace, search: results.Search) -> None:
    trials = trials_of(searched)
    complete = [t for t in trials if t.state == State.COMPLETE]
    (best,) = listing.best_trials(search).to_dict(orient="records")
    assert best["value"] == searched.study.best_trial.value == best_complete(searched).value
    assert best["number"] == best_complete(searched).number

    top = listing.best_trials(search, top=10)
    assert len(top) == len(complete)
    assert list(top["value"]) == sorted((t.value for t in complete), reverse=True)

    grouped = listing.best_trials(search, top=1, by_strategy=True)
    winners = {}
    for t in sorted(complete, key=lambda t: (-t.value, t.number)):
        winners.setdefault(t.params["strategy"], t.number)
    assert dict(zip(grouped["strategy"], grouped["number"], strict=True)) == winners
    assert list(grouped["value"]) == sorted(grouped["value"], reverse=True)


def test_best_command(searched: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "best", str(searched.folder), "--top", "2", "--by", "strategy")
    assert code == 0
    assert "best completed trials by last3_mean_val_acc" in out
    assert "value: the mean of val_acc over the last 3 epochs" in out
    assert "early_gradual" in out
    code, _, err = run(capsys, "best", str(searched.folder), "--top", "0", "--by", "strat")
    assert code == 2 and "--top" in err
    code, _, err = run(capsys, "best", str(searched.folder), "--by", "strat")
    assert code == 2 and "--by: unknown grouping" in err


def test_the_best_config_is_re_run_with_a_new_seed_in_a_study_of_its_own(
    searched: SimpleNamespace, search: results.Search
) -> None:
    best = best_complete(searched)
    reruns = optuna.load_study(study_name="tiny-seeds", storage=searched.cfg.study_url)
    (rerun,) = reruns.get_trials()
    assert rerun.state == State.COMPLETE
    assert rerun.user_attrs["config"] == {
        **best.user_attrs["config"],
        "seed": 1,
        "reseed_of": best.number,
    }
    assert rerun.params == best.params
    # The search's own study keeps one seed per config: what its sampler learned from.
    assert all("reseed_of" not in t.user_attrs["config"] for t in trials_of(searched))
    (top,) = listing.best_trials(search).to_dict(orient="records")
    assert (top["number"], top["seeds"]) == (best.number, 2)
    assert top["seed_mean"] == pytest.approx((best.value + rerun.value) / 2)
    assert top["seed_sd"] == pytest.approx(abs(best.value - rerun.value) / 2**0.5)
    # val_se: one reading's sampling error on the 32 validation samples of the tiny data.
    p = top["seed_mean"]
    assert top["val_se"] == pytest.approx((p * (1 - p) / 32) ** 0.5)
    assert top["train_sd"] == pytest.approx(
        max(0.0, top["seed_sd"] ** 2 - top["val_se"] ** 2) ** 0.5
    )


def test_the_winner_is_the_config_with_the_best_mean_over_its_seeds(
    tmp_path: Path, searched: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (inputs.SEARCH_FILE, STUDY_FILE):
        shutil.copy(searched.folder / name, copy)
    url = f"sqlite:///{copy / STUDY_FILE}"
    # The second-best config re-run with two seeds that both beat the best one's single reading.
    complete = sorted(
        (t for t in trials_of(searched) if t.state == State.COMPLETE), key=lambda t: -t.value
    )
    first, second = complete[0], complete[1]
    reruns = optuna.load_study(study_name="tiny-seeds", storage=url)
    for seed in (1, 2):
        reruns.add_trial(
            optuna.trial.create_trial(
                value=first.value + 1.0,
                user_attrs={
                    "config": {
                        **second.user_attrs["config"],
                        "seed": seed,
                        "reseed_of": second.number,
                    }
                },
            )
        )
    opened = results.open_search(copy)
    table = listing.best_trials(opened, top=2)
    assert int(table["number"].iloc[0]) == second.number
    assert table["seeds"].iloc[0] == 3
    code, out, err = run(capsys, "best", str(copy), "--top", "2")
    assert code == 0, err
    assert "re-run configs first, by seed_mean over their seeds" in out
    out_file = tmp_path / "winner.yaml"
    code, out, err = run(capsys, "export", str(copy), "--out", str(out_file))
    assert code == 0, err
    assert config.load(out_file).provenance["trial"] == second.number


def test_a_search_without_completed_trials_has_no_best_and_no_export(
    tmp_path: Path, searched: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = SearchConfig(name="allfailed", storage_path=str(tmp_path), space=searched.cfg.space)
    inputs.write_inputs(cfg, *load_inputs(searched.cfg))
    study = optuna.create_study(storage=cfg.study_url, study_name=cfg.name, direction="maximize")
    add_failed_trial(study, load_space(searched.space_file).distributions())
    out_file = tmp_path / "schedule.yaml"
    for argv in (["best", str(cfg.folder)], ["export", str(cfg.folder), "--out", str(out_file)]):
        code, out, err = run(capsys, *argv)
        assert code == 2, argv
        assert "SEARCH: no completed trial (1 failed)" in err
        assert "unfreeze-hpo trials" in err
        assert "Traceback" not in out + err
    assert not out_file.exists()


# ---------------------------------------------------------------------------------------------
# export


def test_export_then_replay_reproduces_the_trials_final_metric(
    tmp_path: Path, searched: SimpleNamespace, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    best = best_complete(searched)
    out_file = tmp_path / "schedule.yaml"
    code, out, err = run(capsys, "export", str(searched.folder), "--out", str(out_file))
    assert code == 0, err
    assert f"wrote {out_file}: trial {best.number} (complete)" in out
    assert f"unfreeze-hpo train --config {out_file}" in out

    cfg = config.load(out_file)  # the exported file validates as a trial config
    assert cfg.strategy.name == best.params["strategy"]
    assert cfg.optimizer.backbone_lr_mult == best.params["optimizer.backbone_lr_mult"]
    assert cfg.output_dir == f"runs/tiny-trial-{best.number}"
    record = cfg.provenance
    assert record is not None
    assert record["search"] == str(searched.folder)
    assert (record["study"], record["trial"], record["state"]) == ("tiny", best.number, "complete")
    assert record["ray_trial_id"] == best.user_attrs["ray_trial_id"]
    assert (record["metric"], record["value"]) == ("last3_mean_val_acc", best.value)
    assert record["objective"] == "the mean of val_acc over the last 3 epochs"
    assert record["final"]["val_acc"] == best.user_attrs["final"]["val_acc"]
    # The realized timeline, each event naming the blocks it opened (last blocks first to open).
    timeline = best.user_attrs["timeline"]
    assert [(e["epoch"], e["n_trainable"]) for e in record["timeline"]] == [
        (e["epoch"], e["n_trainable"]) for e in timeline
    ]
    assert timeline, "an early_gradual trial unfreezes at epoch 1"
    assert record["timeline"][0]["blocks"] == ["blocks.4.res_blocks.0"]

    # Replay: same seed, one torch thread like the trial (cpus_per_trial=1), fresh folder.
    summary = train.run(cfg.replace(output_dir=str(tmp_path / "replay")), log=lambda _: None)
    recorded = best.user_attrs["final"]
    for metric in ("best_val_acc", "val_acc", "val_loss", "train_loss"):
        # Exact: CPU, one thread, the epoch order a pure function of (seed, epoch).
        assert summary.final[metric] == recorded[metric], metric
    replayed = [row["val_acc"] for row in trialdir.read_rows(Path(summary.output_dir))]
    assert Objective().value(replayed) == best.value
    assert [(e["epoch"], e["n_trainable"]) for e in summary.timeline] == [
        (e["epoch"], e["n_trainable"]) for e in timeline
    ]
    assert [e["blocks"] for e in summary.timeline] == [e["blocks"] for e in record["timeline"]]


def test_the_test_split_is_shown_beside_the_objective_where_trials_measured_it(
    tmp_path: Path, searched: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    """`trials`, `best`, the exported schedule's header and the report's table show the test
    accuracy at the best val epoch for trials whose data had a test split, and no such column
    for a search without one."""
    from unfreeze_hpo.results import report

    assert "test_acc" not in listing.trials_table(results.open_search(searched.folder)).columns
    folder = tmp_path / "with-test"
    shutil.copytree(searched.folder, folder)
    search = results.open_search(folder)
    assert str(folder) in search.study_url  # the copy's own study: the fixture's stays as it is
    optuna.delete_study(study_name="tiny-seeds", storage=search.study_url)  # rank by value alone
    study = search.study
    best = best_complete(searched)
    final = {**best.user_attrs["final"], "test_acc_at_best": 0.6125}
    study.add_trial(
        optuna.trial.create_trial(
            state=State.COMPLETE,
            value=best.value + 0.1,
            params=best.params,
            distributions=best.distributions,
            user_attrs={**best.user_attrs, "ray_trial_id": "with-test", "final": final},
            intermediate_values=best.intermediate_values,
        )
    )
    number = len(study.trials) - 1

    code, out, err = run(capsys, "trials", str(folder), "--format", "csv")
    assert code == 0, err
    rows = {int(r["number"]): r for r in pd.read_csv(io.StringIO(out)).to_dict("records")}
    assert rows[number]["test_acc"] == 0.6125
    assert all(math.isnan(r["test_acc"]) for n, r in rows.items() if n != number)
    code, out, err = run(capsys, "best", str(folder), "--format", "csv")
    assert code == 0, err
    assert pd.read_csv(io.StringIO(out)).to_dict("records")[0]["test_acc"] == 0.6125
    schedule = tmp_path / "schedule.yaml"
    code, out, err = run(capsys, "export", str(folder), "--out", str(schedule))
    assert code == 0, err
    assert "test acc 0.6125 at the best val epoch" in schedule.read_text()
    records = report.read_trials(study, folder)
    table = report.trials_table(records, search.metric)
    shown = dict(zip(table["trial"], table["test acc (at best val)"], strict=True))
    assert shown[number] == 0.6125


def test_export_refuses_bad_trial_numbers_and_incomplete_trials(
    tmp_path: Path, searched: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, out_file = str(searched.folder), tmp_path / "schedule.yaml"
    count = len(trials_of(searched))
    for number in (str(count), "-1"):
        code, out, err = run(capsys, "export", folder, "--trial", number, "--out", str(out_file))
        assert code == 2
        assert f"--trial: out of range: this search's trials are numbered 0 to {count - 1}" in err
        assert "Traceback" not in out + err
    pruned = next(t for t in trials_of(searched) if t.state == State.PRUNED)
    argv = ["export", folder, "--trial", str(pruned.number), "--out", str(out_file)]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert f"trial {pruned.number} was pruned: loss x" in err and "--allow-incomplete" in err
    assert not out_file.exists()

    code, out, _ = run(capsys, *argv, "--allow-incomplete")
    assert code == 0 and "(pruned)" in out
    record = config.load(out_file).provenance
    assert record is not None
    assert (record["state"], record["reason"]) == ("pruned", pruned.user_attrs["reason"])
    assert record["timeline"][-1]["n_trainable"] == 5  # fixed opens every block at epoch 2


def test_a_failed_export_leaves_the_previous_file_intact(
    tmp_path: Path, search: results.Search, monkeypatch: pytest.MonkeyPatch
) -> None:
    out_file = write(tmp_path / "schedule.yaml", "previous: schedule\n")

    def half_then_fail(data: Any, stream: Any, **kwargs: Any) -> None:
        stream.write("model:\n  name: pytorch")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(yaml, "dump", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        export.export_schedule(search, out_file)
    assert out_file.read_text() == "previous: schedule\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["schedule.yaml"]  # no temp file left

    monkeypatch.undo()
    export.export_schedule(search, out_file)
    assert config.load(out_file).provenance is not None


def test_the_yaml_writer_quotes_strings_the_project_reader_would_take_for_numbers(
    tmp_path: Path,
) -> None:
    values = {"a": "1e3", "b": "010", "c": "yes", "d": 1e-5, "e": math.inf, "f": [[0, 0], [2, 5]]}
    path = yamlfile.write_yaml(tmp_path / "v.yaml", values, "# header\n")
    assert yamlfile.parse_yaml(path.read_text())[0] == values


def test_the_nothing_lost_check_passes_this_search_and_catches_a_running_trial(
    searched: SimpleNamespace, tmp_path: Path
) -> None:
    assert_nothing_lost(searched.folder, 6)  # 5 searched + the synthetic failed trial
    copy = tmp_path / "tiny"
    shutil.copytree(searched.folder, copy)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{copy / STUDY_FILE}")
    study.ask()  # a trial left RUNNING, as OptunaSearch leaves one on a NaN metric
    with pytest.raises(AssertionError) as caught:
        assert_nothing_lost(copy, 6)
    assert "7 trials recorded, 6 requested" in str(caught.value)
    assert "is RUNNING" in str(caught.value)


def test_the_nothing_lost_check_accounts_for_every_injected_fault(
    searched: SimpleNamespace, tmp_path: Path
) -> None:
    complete = next(t for t in searched.study.get_trials() if t.state == State.COMPLETE)
    trial_id = complete.user_attrs["ray_trial_id"]

    def entry(kind: str, attempt: str = "a1", **where: int) -> dict[str, Any]:
        return {"fault": 0, "kind": kind, "trial_id": trial_id, "attempt": attempt, "where": where}

    cases = {
        "fired 2 times": [entry("inf_grad", step=3), entry("inf_grad", step=3)],
        "out of memory, but COMPLETE": [entry("oom", epoch=1, step=4, stage=1)],
        "1 worker(s) killed, 0 restarts": [entry("exit", epoch=1)],
        "NaN metric, but COMPLETE": [entry("nan_metric", epoch=1)],
        "1 infinite gradient steps, 0 skipped": [entry("inf_grad", step=3)],
        "met 1 fault(s) but is not recorded": [{**entry("exit", epoch=0), "trial_id": "nobody"}],
    }
    for expected, fired in cases.items():
        log = write(tmp_path / "faults.jsonl", "".join(json.dumps(e) + "\n" for e in fired))
        with pytest.raises(AssertionError, match=re.escape(expected)):
            assert_nothing_lost(searched.folder, 6, faults_log=log)


def test_a_search_recorded_before_its_settings_were_nested_opens_with_them(
    searched: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(searched.folder / STUDY_FILE, old)
    record = yaml.safe_load((searched.folder / inputs.SEARCH_FILE).read_text())
    options = record["search"]
    pruning, asha = options.pop("pruning"), options.pop("asha")
    # How a search.yaml of an earlier version names them: flat, under other names.
    options |= {
        "prune_loss_ratio": pruning["max_loss_ratio"],
        "prune_unrecovered": pruning["require_recovery"],
        "grace_period": asha["grace_period"] + 1,
        "reduction_factor": asha["reduction_factor"],
    }
    (old / inputs.SEARCH_FILE).write_text(yaml.safe_dump(record))
    cfg, _, _ = results._read_record(old / inputs.SEARCH_FILE)
    assert cfg.pruning.max_loss_ratio == searched.cfg.pruning.max_loss_ratio == 1.3
    assert cfg.asha.grace_period == searched.cfg.asha.grace_period + 1
    code, out, err = run(capsys, "trials", str(old), "--format", "json")
    assert code == 0, err
    assert len(json.loads(out)) == len(searched.study.get_trials())
