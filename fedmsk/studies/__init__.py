"""The five source studies as ready-to-run protocols.

``fedmsk simulate study=NAME`` composes ``configs/study/NAME.yaml`` (task, model, data sizes,
splits), runs the federation, then calls :func:`run_study_analysis`, which trains the study's
extra runs (per-view models, other architectures, static augmentation) in the same mode and
adds the study's own analysis to the run directory: a ``study`` section, ``readers`` and
``comparisons`` in ``results.json`` (the report renders the last two) and ``study_table.md``.
"""

from __future__ import annotations

from fedmsk.studies.registry import (
    get_study,
    run_study_analysis,
    study_names,
    write_study_comparison,
)

__all__ = ["get_study", "run_study_analysis", "study_names", "write_study_comparison"]
