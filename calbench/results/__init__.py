"""The results folder: what `compare`, `certify` and `tune` log, and how it is read back.

- :mod:`~calbench.results.store`: ``results.csv``, ``settings.json``, ``certification.csv``, ``shift.csv``
  and the test predictions, written atomically under a folder lock;
- :mod:`~calbench.results.shards`: one shard per job of a launched grid, merged into ``results.csv``
  without cross-node locks, failed jobs, and read-only views of a folder with its shards;
- :mod:`~calbench.results.layout`: how datasets that share a name and diagram files are named.
"""

from calbench.results.layout import dataset_labels, diagram_stem
from calbench.results.shards import (
    FAILED_JOBS,
    SHARDS,
    ShardStore,
    logged_rows,
    logged_settings,
    logged_shift,
    merge_shards,
    read_failed_jobs,
    record_jobs,
    shard_name,
    shard_path,
)
from calbench.results.store import (
    CERTIFY_COLUMNS,
    CERTIFY_KEY,
    KEY,
    RESULT_COLUMNS,
    SCORED,
    SETTINGS_NAME,
    SHIFT_COLUMNS,
    SHIFT_KEY,
    ResultsStore,
    Row,
    open_folder,
    put_certification,
    put_shift,
    read_certification,
    read_results,
    read_settings,
    read_shift,
    read_shift_file,
)

__all__ = [
    "CERTIFY_COLUMNS",
    "CERTIFY_KEY",
    "FAILED_JOBS",
    "KEY",
    "RESULT_COLUMNS",
    "SCORED",
    "SETTINGS_NAME",
    "SHARDS",
    "SHIFT_COLUMNS",
    "SHIFT_KEY",
    "ResultsStore",
    "Row",
    "ShardStore",
    "dataset_labels",
    "diagram_stem",
    "logged_rows",
    "logged_settings",
    "logged_shift",
    "merge_shards",
    "open_folder",
    "put_certification",
    "put_shift",
    "read_certification",
    "read_failed_jobs",
    "read_results",
    "read_settings",
    "read_shift",
    "read_shift_file",
    "record_jobs",
    "shard_name",
    "shard_path",
]
