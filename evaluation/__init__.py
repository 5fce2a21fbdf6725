"""Evaluation: metrics with patient bootstrap CIs and paired tests (:mod:`evaluation.metrics`),
the study report (:mod:`evaluation.report`) and every overlay and figure
(:mod:`evaluation.figures`).

Imports only :mod:`cxr_io` of this project.
"""
