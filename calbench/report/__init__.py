"""Reports: typed blocks (:mod:`.blocks`) rendered to Markdown and HTML, and the results-folder
report of `calbench compare` / `calbench report` (:mod:`.results`), and the same table as LaTeX and
every metric as a tidy CSV (:mod:`.tables`), all from one :mod:`.summary`. No torch is imported here:
a report re-renders from the files in a results folder alone."""

from calbench.report.results import write_results_report

__all__ = ["write_results_report"]
