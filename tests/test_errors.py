"""calbench.errors: what a file-system error says (the culprit and what to do), and the seed check."""

import errno
import os

import numpy as np
import pytest

from calbench.errors import CalbenchError, check_seed, describe_os_error

# --- file-system errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, culprit, message",
    [
        (
            errno.ENOSPC,
            "r/.results.csv-abcd1234.tmp",
            "cannot write r/results.csv: no space left on device; free space or pass --out on another disk",
        ),
        (errno.EROFS, "r/x.npy", "cannot write r/x.npy: read-only file system; pass --out on a writable disk"),
        (errno.EACCES, "r", "cannot access r: permission denied; fix its permissions or pass --out you can write to"),
        (errno.EISDIR, "r", "cannot use r: it is a folder, not a file; pass --out a file path instead"),
        (errno.EMFILE, "r", "cannot open r: too many open files; raise the limit with `ulimit -n`"),
        (errno.EXDEV, "r", "cannot use r: invalid cross-device link; check the path"),
    ],
)
def test_each_os_error_says_what_failed_and_what_to_do(code, culprit, message):
    assert describe_os_error(OSError(code, os.strerror(code), culprit), "--out") == message


@pytest.mark.parametrize(
    "exc, message",
    [
        (OSError("cannot identify image file 'a.png'"), "cannot identify image file 'a.png'; check the file it names"),
        (
            ConnectionError("Connection refused"),
            "network error (Connection refused); check the connection and try again",
        ),
    ],
)
def test_an_os_error_of_a_library_keeps_its_own_words(exc, message):
    assert describe_os_error(exc) == message


def test_an_os_error_without_a_path_still_says_what_to_do():
    assert describe_os_error(OSError(errno.ENOSPC, "No space left on device")) == (
        "cannot write a file: no space left on device; free space or choose a folder on another disk"
    )


# --- seeds ------------------------------------------------------------------------------------------


def test_library_entry_points_check_seeds_too():
    from calbench.compare import Grid
    from calbench.tune import TuneConfig

    with pytest.raises(CalbenchError, match=r"^--seeds takes seeds from 0 to 4294967295 \(2\*\*32 - 1\); got -1$"):
        Grid(["zero-shot"], [-1]).check()
    with pytest.raises(CalbenchError, match=r"^--split-seeds takes seeds .*; got 100000000000000000000$"):
        TuneConfig(split_seeds=[10**20])
    assert check_seed(2**32 - 1) == 2**32 - 1 and check_seed(np.int64(0)) == 0
    for bad in (True, 1.5, "1", -1, 2**32):
        with pytest.raises(CalbenchError):
            check_seed(bad)
