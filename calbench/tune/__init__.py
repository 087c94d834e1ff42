"""`calbench tune`: Optuna search of a method's hyper-parameters on the validation split only.

CalibPrompt's own limitation (Basu et al., BMVC 2025) is that its gains depend on loss
weights chosen by hand per model and dataset. A study searches them on the few-shot
train/validation splits (the test split is never loaded), under an accuracy constraint
against CoOp-CE, with pruning at epoch checkpoints. Studies live in any Optuna storage, so
a re-run resumes and several processes or machines share one study. Only the chosen
setting is then scored on the test split, once.

- :mod:`.space`: search spaces and the hand-set settings trials start from;
- :mod:`.config`: what defines a study and how trials are judged;
- :mod:`.worker` and :mod:`.evidence`: the objective each trial runs, on every fold's held-out images,
  clean and shifted;
- :mod:`.selection`: which setting is handed back (the hand-set one unless a trial beats it beyond
  the noise, by a paired bootstrap);
- :mod:`.storage` and :mod:`.study`: where a study lives, the search loop, best_params.json;
- :mod:`.limits`: searches refused up front or stopped (every trial failing);
- :mod:`.run`: the whole command; :mod:`.report` and :mod:`.report_verdict`: its report.
"""

from calbench.tune.config import TuneConfig
from calbench.tune.run import TuneRequest, TuneRun, final_test, modality_pairs, run_tune
from calbench.tune.space import parse_space, read_space_file
from calbench.tune.study import SearchResult, best_params_document, search

__all__ = [
    "SearchResult",
    "TuneConfig",
    "TuneRun",
    "best_params_document",
    "final_test",
    "modality_pairs",
    "parse_space",
    "read_space_file",
    "TuneRequest",
    "run_tune",
    "search",
]
