"""Applications of the density formula (DESIGN.md §4): certifying ELBO training and the diffusion classifier."""

from .certify import CertifyReport, certify_mixture, continuous_elbo_objective, ddpm_elbo_objective, fit_em
from .classifier import (
    ClassifierResult,
    MixtureClassConditional,
    bayes_log_posterior,
    classify,
    confusion_matrix,
    expected_calibration_error,
)
from .parametric import ParametricMixture

__all__ = [
    "CertifyReport",
    "certify_mixture",
    "continuous_elbo_objective",
    "ddpm_elbo_objective",
    "fit_em",
    "ClassifierResult",
    "MixtureClassConditional",
    "bayes_log_posterior",
    "classify",
    "confusion_matrix",
    "expected_calibration_error",
    "ParametricMixture",
]
