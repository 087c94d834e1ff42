"""Several `calbench tune` processes on one study: the total is met (with at most one surplus trial per
other worker), nothing is lost, and a killed worker's trial is retried by the next run (heartbeats)."""

import multiprocessing
import time

import optuna
import pytest
import torch
from optuna.trial import TrialState

from calbench.errors import CalbenchError
from calbench.session import FewShot, RunContext
from calbench.tune import TuneConfig, search
from calbench.tune.storage import open_storage
from calbench.tune.worker import Worker

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def warm_cache(session, cache_dir):
    """Encode the few-shot features once, so that workers start training at the same time."""
    session.fit_data(1, FewShot(shots=8))
    return cache_dir


def _search(cache_dir, storage, trials, epochs, report, hang=False):
    """One worker process: the library call behind `calbench tune --search-only`; writes how many trials it ran.

    ``hang`` stalls its first trial after one epoch (heartbeats go on), so it can be killed mid-trial."""
    torch.set_num_threads(1)
    if hang:
        Worker.checkpoint = lambda *args: lambda epoch, losses: time.sleep(600)
    result = search(
        TuneConfig(epochs=epochs, split_seeds=[1]),
        trials,
        "shared",
        storage,
        RunContext(device="cpu", cache_dir=cache_dir),
        heartbeat=1,
    )
    report.write_text(str(result.ran))


def _worker(cache_dir, storage, trials, epochs, report, hang=False):
    """A separate OS process (forked: this one has already imported torch, which saves seconds per worker)."""
    process = multiprocessing.get_context("fork").Process(
        target=_search, args=(cache_dir, storage, trials, epochs, report, hang), daemon=True
    )
    process.start()
    return process


def test_two_workers_share_one_study_without_losing_or_repeating_trials(warm_cache, tmp_path):
    storage = f"journal:{tmp_path / 'study.log'}"
    reports = [tmp_path / f"ran{i}" for i in range(2)]
    workers = [_worker(warm_cache, storage, 6, 10, report) for report in reports]
    for w in workers:
        w.join(timeout=240)
    assert [w.exitcode for w in workers] == [0, 0]
    trials = optuna.load_study(study_name="shared", storage=open_storage(storage, 1)).get_trials()
    trained = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert 6 <= len(trained) <= 7  # the other worker's trial running when the total was reached: one surplus
    assert len(trained) == len(trials)  # nothing lost, failed, running or waiting
    assert sum(int(r.read_text()) for r in reports) == len(trials)  # each trial taken by exactly one worker
    assert len({t.user_attrs["worker"] for t in trained}) == 2  # both took part
    assert trials[0].user_attrs["enqueued"] == "default"
    # how many workers ran a study does not change a trial's result: the default scores as one worker scores it
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        context = RunContext(device="cpu", cache_dir=warm_cache)
        alone = search(
            TuneConfig(epochs=10, split_seeds=[1]),
            1,
            "alone",
            f"sqlite:///{tmp_path / 'alone.db'}",
            context,
            heartbeat=1,
        )
    finally:
        torch.set_num_threads(before)
    assert alone.trials[0].params == trials[0].params
    assert alone.trials[0].user_attrs["val"] == pytest.approx(trials[0].user_attrs["val"], abs=1e-6)  # float32


def test_a_killed_workers_trial_is_retried_by_the_next_run(warm_cache, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    worker = _worker(warm_cache, storage, 1, 10, tmp_path / "ran-killed", hang=True)
    try:
        deadline = time.time() + 180
        running = False
        while time.time() < deadline and worker.is_alive() and not running:
            time.sleep(0.2)
            try:
                running = any(
                    t.state == TrialState.RUNNING
                    for t in optuna.load_study(study_name="shared", storage=open_storage(storage, 1)).get_trials()
                )
            except (KeyError, CalbenchError):  # the study or its database is not created yet
                pass
        time.sleep(1.5)  # mid-trial (stalled after its first epoch), heartbeats still beating
        assert running and worker.is_alive()
    finally:
        worker.kill()
        worker.join()
    time.sleep(3.5)  # past the grace period of 3 heartbeats
    rerun = _worker(warm_cache, storage, 1, 10, tmp_path / "ran")
    rerun.join(timeout=240)
    assert rerun.exitcode == 0
    trials = optuna.load_study(study_name="shared", storage=open_storage(storage, 1)).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].system_attrs["failed_trial"] == 0 and trials[1].params == trials[0].params
    assert (tmp_path / "ran").read_text() == "1"
