"""recon_jax: training-data reconstruction from released network weights, in JAX."""

import warnings

# jaxopt 0.8.5 is archived and warns on import. We keep it behind a solver seam
# (recon_jax.solvers) and filter exactly that one message, nothing else.
warnings.filterwarnings("ignore", message=r"JAXopt is no longer maintained", category=DeprecationWarning)

__version__ = "0.1.0"
