"""The command line: `sde-diffusion <app> [arguments]`, or `python -m sde_diffusion <app> ...`.

The apps are thin layers that turn a config into library calls; they import the library and the
library never imports them, so importing an app changes no name of `sde_diffusion`.

    train       train a score model (Hydra: sde=, model=, data=, loss=, train= overrides)
    sample      sample a checkpoint or the oracle with any solver, measure, write (Hydra)
    report      collect a sweep directory into a CSV, a Markdown table and a plot
    likelihood  PF-ODE log-likelihood, the DDPM bound and bits/dim (Hydra)
    demo        train an MLP on the swiss roll in about a minute and score it

Hydra apps take Hydra's own flags too: `-m` for a multirun sweep, `hydra/launcher=...`,
`hydra.run.dir=...`, `--help`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

APPS = {
    "train": "train a score model",
    "sample": "sample a checkpoint or the oracle with any solver",
    "report": "collect a sweep into tables and a plot",
    "likelihood": "log-likelihood and bits/dim of a score model",
    "demo": "train on the swiss roll in a minute and score it",
}

__all__ = ["APPS", "main"]


def _usage() -> str:
    apps = "\n".join(f"  {name:<11} {what}" for name, what in APPS.items())
    return f"usage: sde-diffusion <app> [arguments]\n\napps:\n{apps}\n"


def main(argv: Sequence[str] | None = None) -> None:
    """Run the app named by the first argument with the rest of the command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage(), end="")
        sys.exit(0 if args else 2)
    app, rest = args[0], args[1:]
    if app not in APPS:
        sys.exit(f"error: unknown app {app!r}; valid choices: {', '.join(APPS)}")
    # the app (Hydra or argparse) reads sys.argv: it sees its own arguments only
    sys.argv = [f"sde-diffusion {app}", *rest]
    importlib.import_module(f"{__name__}.{app}").main()
