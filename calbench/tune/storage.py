"""Where a `tune` study lives, and how dead workers are noticed.

Database storages (SQLite, PostgreSQL, MySQL: Optuna's ``RDBStorage``) get Optuna's trial
heartbeats: a worker's thread stamps its running trial every ``heartbeat`` seconds, and a trial
not stamped for ``3 * heartbeat`` seconds is failed and queued again with the same parameters
(:class:`optuna.storages.RetryHeartbeatStaleTrialCallback`). Optuna's journal file storage has
no heartbeat (Optuna 5.1: ``JournalStorage`` takes none; optuna/optuna issue 6615 asks for one),
so a journal study cannot tell a dead worker from a slow one: its trials left running are failed
and queued again only when every worker has ended (:func:`calbench.tune.study.requeue_orphans`,
run by ``--launcher`` before the final job). Every storage stays readable by plain Optuna
(``optuna.load_study``, ``optuna-dashboard``).

PostgreSQL goes through psycopg 3 (the ``calbench[postgres]`` extra): ``postgresql://`` URLs
are read as ``postgresql+psycopg://`` when it is installed, so no second driver is needed.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend

from calbench.errors import CalbenchError

#: a killed worker's trial is retried at most this many times (a trial that kills its worker every time stops)
MAX_RETRY = 3
#: a running trial without a heartbeat for this many intervals is stale (calbench's choice: Optuna's RDB default
#: grace period is 2, optuna/storages/_rdb/storage.py; one more spares a worker merely slow on a loaded machine)
STALE_HEARTBEATS = 3
#: the explicit form of a journal file, so that a mistyped URL is not taken for a file name
JOURNAL = "journal:"


def has_heartbeats(url: str) -> bool:
    """Whether trials in this storage beat (a database) or not (a journal file)."""
    return not url.startswith(JOURNAL)


def retry_callback() -> RetryHeartbeatStaleTrialCallback:
    """Optuna's retry of a failed trial with its parameters, at most :data:`MAX_RETRY` times."""
    with warnings.catch_warnings():  # "experimental" in Optuna; the README says so once
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)


def default_storage(out: Path) -> str:
    """A SQLite file in the output folder."""
    return f"sqlite:///{(Path(out) / 'study.db').resolve()}"


def open_storage(url: str, heartbeat: int = 10) -> BaseStorage:
    """An Optuna storage from a database URL (``sqlite:///...``, ``postgresql://...``, ``mysql+pymysql://...``,
    with heartbeats) or a journal file (``journal:PATH``, without: Optuna has none for journal files)."""
    if heartbeat < 1:
        raise CalbenchError(f"--heartbeat must be a whole number of seconds >= 1, got {heartbeat}")
    if url.startswith(JOURNAL):
        return _journal(url)
    if "://" not in url:
        raise CalbenchError(
            f"--storage {url} is neither a database URL (sqlite:///PATH, postgresql+psycopg://USER@HOST/DB, "
            f"mysql+pymysql://...) nor a journal file ({JOURNAL}PATH)"
        )
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; the README says so once
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _database(database_url(url), heartbeat)


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


def _journal(url: str) -> JournalStorage:
    path = Path(url[len(JOURNAL) :]).expanduser()
    if not str(path) or path.is_dir():
        raise CalbenchError(
            f"--storage {url} is not a file; give a journal file (e.g. {JOURNAL}{path / 'study.log'}) or a database URL"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def _database(url: str, heartbeat: int) -> RDBStorage:
    if url.startswith("sqlite:///"):
        database = Path(url[len("sqlite:///") :])
        if database.is_dir():
            raise CalbenchError(f"--storage {url} names a folder; name a database file, e.g. {database / 'study.db'}")
        database.parent.mkdir(parents=True, exist_ok=True)
    # several workers write the same SQLite file: wait for its lock instead of failing at once
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    attempt = 1
    while True:
        try:
            return RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=heartbeat,
                grace_period=STALE_HEARTBEATS * heartbeat,
                heartbeat_stale_trial_callback=retry_callback(),
            )
        except ImportError as exc:
            raise _missing_driver(url, exc) from None
        except Exception as exc:  # bad URL, unreachable server; or two workers creating the same new database
            # a table another worker created first, or its schema row (an IntegrityError: PostgreSQL's
            # "duplicate key value", SQLite's "UNIQUE constraint failed")
            racing = "already exists" in str(exc) or type(exc).__name__ == "IntegrityError"
            if not racing or attempt == CREATE_TRIES:
                raise CalbenchError(f"cannot open storage {shown_url(url)}: {str(exc).splitlines()[0]}") from None
            attempt += 1
            time.sleep(0.5)
