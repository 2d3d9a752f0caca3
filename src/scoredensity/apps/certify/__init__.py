"""Certifying ELBO training (Li & Yan 2024, §4.1; docs/design.md §4): fit one family by denoising losses and by maximum
likelihood, and measure how far apart the fits land.

Layout: :mod:`.objectives` (the denoising losses as fixed-draw objectives, the neural minibatch losses),
:mod:`.fitting` (L-BFGS, EM, k-means start, comparing fits, the neural training loop) and :mod:`.report` (the
experiment, its rows, verdict and plot). Every public name is re-exported here.
"""

from ...ddpm import VARIANCES
from .fitting import fit_em, fit_objective, kmeans_init, match_components, parameter_distance, train_denoiser
from .objectives import (
    NEURAL_LOSSES,
    DenoisingObjective,
    check_points,
    continuous_elbo_objective,
    ddpm_elbo_objective,
    ddpm_step_weights,
    denoising_loss,
    pilot_proposal,
)
from .report import CertifyReport, CertifyRow, certify_data, certify_mixture, plot_gap

__all__ = [
    "DenoisingObjective",
    "check_points",
    "continuous_elbo_objective",
    "ddpm_elbo_objective",
    "ddpm_step_weights",
    "fit_objective",
    "pilot_proposal",
    "plot_gap",
    "fit_em",
    "kmeans_init",
    "match_components",
    "parameter_distance",
    "CertifyRow",
    "CertifyReport",
    "certify_mixture",
    "certify_data",
    "denoising_loss",
    "train_denoiser",
    "NEURAL_LOSSES",
    "VARIANCES",
]
