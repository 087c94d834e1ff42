"""Where a `tune` study lives, and how dead workers are noticed.

Every storage gets trial heartbeats: a worker's thread stamps its running trial every
``heartbeat`` seconds, and a trial not stamped for ``3 * heartbeat`` seconds is marked
failed and re-queued with the same parameters (Optuna's heartbeat mechanism and
:class:`optuna.storages.RetryHeartbeatStaleTrialCallback`). Optuna's RDB storages
(SQLite, PostgreSQL, MySQL) implement heartbeats; its journal file storage does not, so
:class:`HeartbeatJournalStorage` adds them, keeping the stamp as a trial system attribute.
Every storage stays readable by plain Optuna (``optuna.load_study``, ``optuna-dashboard``).

PostgreSQL goes through psycopg 3 (the ``calbench[postgres]`` extra): ``postgresql://`` URLs
are read as ``postgresql+psycopg://`` when it is installed, so no second driver is needed.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Optional

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from calbench.errors import CalbenchError

HEARTBEAT_KEY = "calbench:heartbeat"
#: a killed worker's trial is retried at most this many times (a trial that kills its worker every time stops)
MAX_RETRY = 3
#: a running trial without a heartbeat for this many intervals is stale (calbench's choice: Optuna's RDB default
#: grace period is 2, optuna/storages/_rdb/storage.py; one more spares a worker merely slow on a loaded machine)
STALE_HEARTBEATS = 3


def stale_after(heartbeat: int) -> int:
    """Seconds without a heartbeat after which a running trial's worker counts as dead."""
    return STALE_HEARTBEATS * heartbeat


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with heartbeats, so journal files share RDB's crash recovery."""

    def __init__(
        self,
        backend: JournalFileBackend,
        heartbeat_interval: int,
        grace_period: int,
        callback: Optional[Callable[[optuna.Study, FrozenTrial], None]],
    ) -> None:
        super().__init__(backend)
        self._heartbeat_interval = heartbeat_interval
        self._grace_period = grace_period
        self._stale_callback = callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_KEY, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            started = trial.datetime_start.timestamp() if isinstance(trial.datetime_start, datetime) else now
            if now - float(trial.system_attrs.get(HEARTBEAT_KEY, started)) > self._grace_period:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> Optional[int]:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Optional[Callable[[optuna.Study, FrozenTrial], None]]:
        return self._stale_callback


def default_storage(out: Path) -> str:
    """A SQLite file in the output folder."""
    return f"sqlite:///{(Path(out) / 'study.db').resolve()}"


def open_storage(url: str, heartbeat: int = 10) -> BaseStorage:
    """An Optuna storage from a URL (``sqlite:///...``, ``postgresql://...``, ``mysql+pymysql://...``)
    or a journal file (``journal:PATH`` or a plain path), with heartbeats on."""
    if heartbeat < 1:
        raise CalbenchError(f"--heartbeat must be a whole number of seconds >= 1, got {heartbeat}")
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; the README says so once
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _open(url, heartbeat)


#: tries at opening a new database that other workers create at the same moment (each try waits 0.5 s)
CREATE_TRIES = 6


def database_url(url: str) -> str:
    """``postgresql://`` as ``postgresql+psycopg://`` when psycopg 3 is installed (SQLAlchemy's
    default PostgreSQL driver is psycopg2, which calbench does not install); other URLs unchanged."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        import importlib.util

        if importlib.util.find_spec("psycopg") is not None:
            return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def shown_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses: it has no password to hide either
        return url


def _missing_driver(url: str, exc: ImportError) -> CalbenchError:
    if url.startswith("postgres"):
        return CalbenchError(
            f"storage {shown_url(url)} needs the PostgreSQL driver psycopg: pip install 'calbench[postgres]'"
        )
    return CalbenchError(
        f"storage {shown_url(url)} needs a database driver that is not installed ({exc}); pip install it"
    )


def _open(url: str, heartbeat: int) -> BaseStorage:
    retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    grace = stale_after(heartbeat)
    if "://" in url and not url.startswith("journal:"):
        url = database_url(url)
        if url.startswith("sqlite:///"):
            database = Path(url[len("sqlite:///") :])
            if database.is_dir():
                raise CalbenchError(
                    f"--storage {url} names a folder; name a database file, e.g. {database / 'study.db'}"
                )
            database.parent.mkdir(parents=True, exist_ok=True)
        # several workers write the same SQLite file: wait for its lock instead of failing at once
        engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
        for attempt in range(CREATE_TRIES):
            try:
                return RDBStorage(
                    url,
                    engine_kwargs=engine,
                    heartbeat_interval=heartbeat,
                    grace_period=grace,
                    heartbeat_stale_trial_callback=retry,
                )
            except ImportError as exc:
                raise _missing_driver(url, exc) from None
            except Exception as exc:  # bad URL, unreachable server; or two workers creating the same new database
                # a table another worker created first, or its schema row (an IntegrityError: PostgreSQL's
                # "duplicate key value", SQLite's "UNIQUE constraint failed")
                racing = "already exists" in str(exc) or type(exc).__name__ == "IntegrityError"
                if racing and attempt < CREATE_TRIES - 1:
                    time.sleep(0.5)
                    continue
                raise CalbenchError(f"cannot open storage {shown_url(url)}: {str(exc).splitlines()[0]}") from None
    path = Path(url[len("journal:") :] if url.startswith("journal:") else url).expanduser()
    if path.is_dir():
        raise CalbenchError(
            f"--storage {url} is a folder; give a journal file in it (e.g. {path / 'study.log'}) or a database URL"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    return HeartbeatJournalStorage(JournalFileBackend(str(path)), heartbeat, grace, retry)
