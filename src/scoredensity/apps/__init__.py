"""Applications of the density formula (DESIGN.md §4): certifying ELBO training and the diffusion classifier."""

from .parametric import ParametricMixture

__all__ = ["ParametricMixture"]
