"""Hydra configs of the apps (a package so that Hydra finds them when installed or run with -m)."""
