"""Step 3 of the data flow: calibrate the base slice's clipping and the routers, block by block."""

from .blockwise import CalibConfig, calibrate_
from .data import calibration_tokens
from .fisher import fit_fisher_

__all__ = ["CalibConfig", "calibrate_", "calibration_tokens", "fit_fisher_"]
