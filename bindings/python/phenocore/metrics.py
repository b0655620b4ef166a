"""Scoring profiles: retrieval metrics (mAP, folds of enrichment, precision@k, replicate
reproducibility), classification metrics with sklearn semantics (AP, ROC-AUC), subprofiles and
Biosimilarity, and statistics (ANOVA, Tukey HSD). Labels are lists of strings or `|`-joined strings."""

from __future__ import annotations

from ._retrieval import *  # noqa: F401,F403
from ._retrieval import __all__ as _retrieval_all
from ._classification import *  # noqa: F401,F403
from ._classification import __all__ as _classification_all

__all__ = [*_retrieval_all, *_classification_all]
