"""Applications of the density formula (docs/design.md §4): certifying ELBO training, the diffusion classifier,
score-matching regularisation of GANs and the diffusion loss for autoregressive models."""

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
