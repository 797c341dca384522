"""SD2's `ldm.models.diffusion.dpm_solver.DPMSolverSampler` import path."""
from ldm.models.diffusion.dpm_solver.sampler import DPMSolverSampler

__all__ = ["DPMSolverSampler"]
