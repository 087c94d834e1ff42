"""`calbench data prepare`: a dataset folder in calbench's layout from the downloads its owners publish.

One module per dataset of the CalibPrompt paper (:mod:`.kather`, :mod:`.pannuke`, :mod:`.digestpath`,
:mod:`.covid`, :mod:`.rsna18`): each reads the download in the shape its owners publish (a zip, a tar
or the extracted folder), checks it before writing anything, and hands work units to the one writer
(:mod:`.writer`), which writes safely and resumably. :mod:`.common` holds the :data:`OFFICIAL` table
of the five datasets and the helpers every preparer shares.
"""

from collections.abc import Callable

from calbench.data.prepare.common import HISTO, OFFICIAL, XRAY, Log, Official, output_stems
from calbench.data.prepare.covid import prepare_covid
from calbench.data.prepare.digestpath import prepare_digestpath
from calbench.data.prepare.kather import prepare_kather
from calbench.data.prepare.pannuke import prepare_pannuke
from calbench.data.prepare.rsna18 import RSNA_CLASSES, prepare_rsna18, read_dicom
from calbench.data.prepare.writer import (
    MARKER,
    SIZE,
    PrepareReport,
    Unit,
    Unreadable,
    decode,
    default_out,
    fit_square,
    prepare_folder,
    stratified_test_keys,
    summary,
)

#: the preparer of each official dataset, by name
PREPARERS: dict[str, Callable[..., PrepareReport]] = {
    "kather": prepare_kather,
    "pannuke": prepare_pannuke,
    "digestpath": prepare_digestpath,
    "covid": prepare_covid,
    "rsna18": prepare_rsna18,
}

__all__ = [
    "HISTO",
    "MARKER",
    "OFFICIAL",
    "PREPARERS",
    "RSNA_CLASSES",
    "SIZE",
    "XRAY",
    "Log",
    "Official",
    "PrepareReport",
    "Unit",
    "Unreadable",
    "decode",
    "default_out",
    "fit_square",
    "output_stems",
    "prepare_covid",
    "prepare_digestpath",
    "prepare_folder",
    "prepare_kather",
    "prepare_pannuke",
    "prepare_rsna18",
    "read_dicom",
    "stratified_test_keys",
    "summary",
]
