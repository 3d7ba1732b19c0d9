"""Experiments from an `ExperimentConfig` to results on disk (`run`)."""

from fedjax_lora.experiment.run import *  # noqa: F403
from fedjax_lora.experiment.run import _finite_or_raise, _finite_per_client, _round_record  # noqa: F401
