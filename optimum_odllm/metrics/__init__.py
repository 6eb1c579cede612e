"""Local `evaluate` metric scripts shipped with the package (load them with ``evaluate.load(path)``)."""

from pathlib import Path

RANKING_METRIC_PATH = str(Path(__file__).with_name("ranking.py"))
