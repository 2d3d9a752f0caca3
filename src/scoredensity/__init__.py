"""scoredensity: the likelihood side of diffusion models.

Log-densities through the score-based density formula (exact for an exact score, a certified lower
bound for a learned one), every standard likelihood estimator side by side, training with likelihood
weighting, samplers, adapters and applications. One time convention: canonical time ``t`` with
``x_t = sqrt(1 - t) x + sqrt(t) z`` (see docs/design.md).
"""

from . import rng
from .adapters import (
    PREDICTION_KINDS,
    ClockEps,
    DiffusersEps,
    betas_from_scheduler_config,
    convert,
    eps_from,
    from_canonical,
    from_flow,
    from_k_diffusion,
    from_ve,
    from_vp_sde,
    pred_from_eps,
)
from .apps import (
    CertifyReport,
    ClassifierResult,
    MixtureClassConditional,
    ParametricMixture,
    bayes_log_posterior,
    certify_mixture,
    classify,
    gan,
)
from .apps.diffusion_loss import CausalTransformerAR, DiffusionLoss
from .apps.gan import GANConfig, GANResult, regulariser_gradient, score_regulariser, train_gan
from .checkpoint import CheckpointError, RunFolderIOError, UnfinishedRunWarning, load_run
from .conventions import CONVENTIONS, Convention, get_convention
from .data import (
    LOGIT_ALPHA,
    DataError,
    Dataset,
    batch_indices,
    dataset_names,
    iterate_batches,
    load_dataset,
    make_dataset,
    split_indices,
)
from .data.toys import BimodalARProcess
from .ddpm import StepProposal, ddpm_elbo, discretized_gaussian_log_likelihood, fit_step_proposal
from .diffusers_io import LoadedDiffusers, load_diffusers, load_diffusers_eps, save_diffusers
from .elbo import elbo
from .epsfn import EpsFn, call_eps, check_data
from .errors import (
    EXIT_CODES,
    DivergenceError,
    InputFileError,
    Interrupted,
    RunBusyError,
    ScoreDensityError,
    UsageError,
    exit_code_for,
)
from .formula import end_terms, fit_proposal, integrate_expected_error, log_density
from .image_eval import evaluate_images
from .logdensity import LogDensity, bits_per_dim
from .losses import LamSampler, dsm_loss, elbo_loss
from .mixtures import MIXTURE_PRESETS, GaussianMixture, mixture_preset
from .nets import MLPDenoiser, UNetDenoiser, build_denoiser, denoiser_config
from .ode import ODESolverError, ode_log_likelihood
from .proposals import LambdaProposal
from .runlock import RunLockedError
from .sampling import (
    SAMPLERS,
    ancestral_sample,
    gaussian_temperature_law,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_euler_maruyama,
    sample_ode,
)
from .schedules import (
    CosineClock,
    DDPMSchedule,
    VEClock,
    VPLinearClock,
    add_noise,
    alpha_sigma,
    alpha_sigma_from_logsnr,
    diffusion_squared,
    drift,
    linear_betas,
    logsnr_from_t,
    t_from_logsnr,
)
from .train import TrainConfig, TrainingDiverged, TrainingInterrupted, TrainResult, evaluate_model, train

__version__ = "0.1.0"

__all__ = [
    "rng",
    "ScoreDensityError",
    "UsageError",
    "InputFileError",
    "DivergenceError",
    "RunBusyError",
    "Interrupted",
    "EXIT_CODES",
    "exit_code_for",
    "CheckpointError",
    "RunFolderIOError",
    "RunLockedError",
    "UnfinishedRunWarning",
    "TrainingDiverged",
    "TrainingInterrupted",
    "Convention",
    "CONVENTIONS",
    "get_convention",
    "StepProposal",
    "fit_step_proposal",
    "load_run",
    "evaluate_images",
    "LamSampler",
    "dsm_loss",
    "elbo_loss",
    "MLPDenoiser",
    "UNetDenoiser",
    "build_denoiser",
    "denoiser_config",
    "TrainConfig",
    "TrainResult",
    "evaluate_model",
    "train",
    "gan",
    "DiffusionLoss",
    "CausalTransformerAR",
    "BimodalARProcess",
    "gaussian_temperature_law",
    "GANConfig",
    "GANResult",
    "regulariser_gradient",
    "score_regulariser",
    "train_gan",
    "CertifyReport",
    "ClassifierResult",
    "MixtureClassConditional",
    "ParametricMixture",
    "bayes_log_posterior",
    "certify_mixture",
    "classify",
    "elbo",
    "ode_log_likelihood",
    "ODESolverError",
    "ddpm_elbo",
    "discretized_gaussian_log_likelihood",
    "sample",
    "sample_ddim",
    "sample_euler_maruyama",
    "sample_ode",
    "sample_ddpm",
    "ancestral_sample",
    "SAMPLERS",
    "PREDICTION_KINDS",
    "ClockEps",
    "DiffusersEps",
    "betas_from_scheduler_config",
    "convert",
    "eps_from",
    "from_canonical",
    "from_flow",
    "from_k_diffusion",
    "from_ve",
    "from_vp_sde",
    "pred_from_eps",
    "LoadedDiffusers",
    "load_diffusers",
    "load_diffusers_eps",
    "save_diffusers",
    "LOGIT_ALPHA",
    "DataError",
    "Dataset",
    "batch_indices",
    "dataset_names",
    "iterate_batches",
    "load_dataset",
    "make_dataset",
    "split_indices",
    "log_density",
    "fit_proposal",
    "end_terms",
    "integrate_expected_error",
    "LambdaProposal",
    "EpsFn",
    "call_eps",
    "check_data",
    "LogDensity",
    "bits_per_dim",
    "GaussianMixture",
    "mixture_preset",
    "MIXTURE_PRESETS",
    "CosineClock",
    "DDPMSchedule",
    "VEClock",
    "VPLinearClock",
    "add_noise",
    "alpha_sigma",
    "alpha_sigma_from_logsnr",
    "diffusion_squared",
    "drift",
    "linear_betas",
    "logsnr_from_t",
    "t_from_logsnr",
]
