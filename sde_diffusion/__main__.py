"""`python -m sde_diffusion <app> [arguments]`: the same command line as `sde-diffusion`."""

from .apps import main

main()
