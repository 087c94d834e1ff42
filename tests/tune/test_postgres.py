"""`calbench tune` on the storages clusters use: a real PostgreSQL server (started here from the
distribution's binaries), SQLite and a journal file. Several `calbench tune` workers share one
study and one is killed mid-trial (its trial is retried: on a database through heartbeats, on a
journal file, which has none, once every worker has ended, as `--launcher` does before the final
job); a seeded single-worker search gives the same study on each storage; and plain Optuna in
another process (what optuna-dashboard runs) reads every attribute.

Without the PostgreSQL server package or the psycopg driver the PostgreSQL cases skip with the
reason (pytest -rs shows it, and a warning names it); under CI (.ci/run) they fail instead.
"""

import json
import multiprocessing
import subprocess
import sys
import time

import optuna
import pytest
import torch
from optuna.trial import TrialState
from postgres_server import REQUIRED, PostgresServer, Unavailable
from services import started
from typer.testing import CliRunner

from calbench.cli.app import app
from calbench.errors import CalbenchError
from calbench.session import FewShot, RunContext, Session
from calbench.tune.storage import open_storage
from calbench.tune.study import requeue_orphans
from calbench.tune.worker import Worker

pytestmark = pytest.mark.e2e
EPOCHS = 4  # fast trials; the demo keeps the paper's 50
MODEL = "tiny-random"  # the fastest model: these tests are about storages and workers, not calibration
STORAGES = ["postgresql", "sqlite", "journal"]


@pytest.fixture(scope="module")
def postgres():
    yield from started(PostgresServer, "PostgreSQL", REQUIRED, Unavailable)


@pytest.fixture
def make_storage(request, tmp_path):
    """kind -> a new, empty storage URL of that kind (a database of its own on the test server)."""

    def make(kind: str, name: str = "study") -> str:
        if kind == "postgresql":
            return request.getfixturevalue("postgres").database(f"{request.node.name[:40]}_{name}".lower())
        if kind == "sqlite":
            return f"sqlite:///{tmp_path / f'{name}.db'}"
        return f"journal:{tmp_path / f'{name}.log'}"

    return make


@pytest.fixture(scope="module")
def warm_cache(cache_dir):
    """Encode the few-shot features once, so that workers start training at the same time."""
    Session(MODEL, "synthetic", RunContext(device="cpu", cache_dir=cache_dir)).fit_data(1, FewShot(shots=8))
    return cache_dir


def _tune_args(storage, cache_dir, out, trials, *extra):
    return [
        "tune",
        *("--model", MODEL),
        *("--storage", storage, "--study", "shared", "--trials", str(trials), "--epochs", str(EPOCHS)),
        *("--heartbeat", "1", "--threads", "1", "--device", "cpu", "--cache-dir", str(cache_dir), "--out", str(out)),
        *("--split-seeds", "1"),  # these tests are about storages and workers, not the data-size rule
        *extra,
    ]


def _cli(args, hang):
    """One `calbench tune` process; ``hang`` stalls its first trial after one epoch, heartbeats going on."""
    if hang:
        Worker.checkpoint = lambda *a: lambda epoch, losses: time.sleep(600)
    app(args, prog_name="calbench")


def _worker(args, hang=False):
    """A separate OS process (forked: torch is already imported here, which saves seconds per worker)."""
    process = multiprocessing.get_context("fork").Process(target=_cli, args=(args, hang), daemon=True)
    process.start()
    return process


def _trials(storage):
    return optuna.load_study(study_name="shared", storage=open_storage(storage, 1)).get_trials()


def _wait_for_running(storage, worker):
    deadline = time.time() + 120
    while time.time() < deadline and worker.is_alive():
        try:
            if any(t.state == TrialState.RUNNING for t in _trials(storage)):
                return True
        except (KeyError, CalbenchError):  # the study or its database is not created yet
            pass
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("kind", STORAGES)
def test_workers_finish_the_study_when_one_is_killed_mid_trial(kind, make_storage, warm_cache, tmp_path):
    storage, trials = make_storage(kind), 6
    args = _tune_args(storage, warm_cache, tmp_path / "out", trials, "--search-only", "--pruner", "none")
    doomed, survivors = _worker(args, hang=True), []
    try:
        assert _wait_for_running(storage, doomed)  # it holds the first trial (the enqueued default)
        survivors = [_worker(args) for _ in range(2)]
        time.sleep(1.5)  # mid-trial: stalled after its first epoch, still beating
        assert doomed.is_alive()
    finally:
        doomed.kill()
        doomed.join()
    for w in survivors:
        w.join(timeout=180)
    assert [w.exitcode for w in survivors] == [0, 0]
    if kind == "journal":  # no heartbeats: the trial waits for every worker to end, then is queued again
        assert [t.number for t in _trials(storage) if t.state == TrialState.RUNNING] == [0]
        study = optuna.load_study(study_name="shared", storage=open_storage(storage, 1))
        assert requeue_orphans(study) == [0]
        last = _worker(args)  # what the launcher's final job does first
        last.join(timeout=180)
        assert last.exitcode == 0
    done = _trials(storage)
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    killed = [t for t in done if t.state == TrialState.FAIL]
    # at most one surplus trial per worker: the survivors' last trials, and the retry if it came after the total
    assert trials <= len(complete) <= trials + 3
    assert [t.number for t in killed] == [0] and "fail_reason" not in killed[0].user_attrs
    retried = [t for t in complete if t.system_attrs.get("failed_trial") == 0]
    assert retried and all(t.params == killed[0].params for t in retried)  # the same setting, run to the end
    assert {t.state for t in done} == {TrialState.COMPLETE, TrialState.FAIL}  # nothing left running or waiting
    assert len({t.user_attrs["worker"] for t in complete}) >= 2
    seen = _read_elsewhere(storage)  # as optuna-dashboard would: the retry and every attribute, as JSON
    assert [t["user"] for t in seen["trials"]] == [json.loads(json.dumps(t.user_attrs)) for t in done]
    assert [t["system"].get("failed_trial") for t in seen["trials"]] == [
        t.system_attrs.get("failed_trial") for t in done
    ]


def _content(trials):
    """What a search found, without where and how fast it ran."""
    return [
        (
            t.number,
            t.state,
            t.params,
            t.values,
            t.intermediate_values,
            {k: v for k, v in t.user_attrs.items() if k not in ("worker", "seconds")},
        )
        for t in trials
    ]


#: what a reader with plain Optuna (as optuna-dashboard) sees: every attribute, through strict JSON
READER = """
import json, sys
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

url, name = sys.argv[1], sys.argv[2]
storage = JournalStorage(JournalFileBackend(url[len("journal:"):])) if url.startswith("journal:") else url
study = optuna.load_study(study_name=name, storage=storage)
trials = [{"user": t.user_attrs, "system": t.system_attrs, "params": t.params} for t in study.trials]
print(json.dumps({"study": study.user_attrs, "trials": trials}, allow_nan=False))
"""


def _read_elsewhere(storage):
    read = subprocess.run(
        [sys.executable, "-c", READER, storage, "shared"], capture_output=True, text=True, timeout=120
    )
    assert read.returncode == 0, read.stderr
    return json.loads(read.stdout)


def test_a_seeded_search_is_the_same_study_on_every_storage_and_optuna_reads_it_elsewhere(
    make_storage, warm_cache, tmp_path
):
    """One worker and --sampler-seed: PostgreSQL, SQLite and journal hold the same trials and give the same
    best_params.json; a separate process with plain Optuna reads every attribute calbench wrote, as JSON."""
    torch.set_num_threads(1)
    found, documents = {}, {}
    for kind in STORAGES:
        try:
            storage = make_storage(kind)
        except pytest.skip.Exception:
            continue  # the PostgreSQL server is unavailable: the reason is reported by the other tests
        out = tmp_path / kind
        args = _tune_args(storage, warm_cache, out, 8, "--sampler-seed", "7", "--final-seeds", "1")
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        trials = _trials(storage)
        found[kind] = _content(trials)
        documents[kind] = json.loads((out / "best_params.json").read_text())
        seen = _read_elsewhere(storage)
        study = optuna.load_study(study_name="shared", storage=open_storage(storage, 1))
        assert seen["study"] == json.loads(json.dumps(study.user_attrs))
        assert set(seen["study"]) == {"config", "reference_accuracy", "reference_hits"}
        assert [t["user"] for t in seen["trials"]] == [json.loads(json.dumps(t.user_attrs)) for t in trials]
        assert {"enqueued", "worker", "pairs", "val", "seconds"} <= set().union(*(t["user"] for t in seen["trials"]))
        assert seen["trials"][0]["user"]["enqueued"] == "default"
    assert "sqlite" in found and "journal" in found
    reference = found["sqlite"]
    assert len(reference) == 8 and len({json.dumps(t[2], sort_keys=True) for t in reference}) == 8
    for kind in found:
        assert found[kind] == reference, kind
        assert documents[kind] == documents["sqlite"], kind


@pytest.mark.parametrize("scheme", ["postgresql+psycopg", "postgresql"])
def test_a_missing_postgres_driver_is_one_line_naming_the_extra(scheme, monkeypatch):
    for name in ("psycopg", "psycopg2"):  # as on a machine without them: `import psycopg` fails
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(CalbenchError) as caught:
        open_storage(f"{scheme}://someone:secret@db.example/calbench")
    assert str(caught.value) == (
        f"storage {scheme}://someone:***@db.example/calbench needs the PostgreSQL driver psycopg: "
        "pip install 'calbench[postgres]'"
    )
