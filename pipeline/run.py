"""The library's entry point: ``run_batch(manifest, station)`` runs or resumes a batch
without the CLI (see :mod:`pipeline.batch.orchestrator`)."""

from .batch.orchestrator import RunResult, run_batch
from .registration.stage import RegisterOptions

__all__ = ["RegisterOptions", "RunResult", "run_batch"]
