import sys

from recon_jax.cli import main

sys.exit(main())
