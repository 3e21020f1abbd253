"""The library apart from its apps: importing any module of the package (every app included)
leaves every public name of `sde_diffusion` the library object it was, no library module imports
an app or Hydra, and the one command line dispatches to the apps and rejects unknown ones."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import sde_diffusion

PACKAGE = Path(sde_diffusion.__file__).parent


def _all_modules() -> list[str]:
    return [
        m.name
        for m in pkgutil.walk_packages([str(PACKAGE)], prefix="sde_diffusion.")
        if not m.name.endswith("__main__")
    ]


def test_importing_every_module_changes_no_public_name():
    before = {name: getattr(sde_diffusion, name) for name in sde_diffusion.__all__}
    modules = _all_modules()
    assert "sde_diffusion.apps.sample" in modules and "sde_diffusion.apps.train" in modules
    for name in modules:
        importlib.import_module(name)
    for name, obj in before.items():
        assert getattr(sde_diffusion, name) is obj, name
    assert callable(sde_diffusion.sample) and sde_diffusion.sample.__module__.endswith("sampling")


def _imports(path: Path) -> set[str]:
    """Absolute names of what a module imports (relative imports resolved against its package)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            out |= {module} | {f"{module}.{a.name}" for a in node.names}
    return out


def test_no_library_module_imports_an_app_or_hydra():
    library = [
        p
        for p in PACKAGE.rglob("*.py")
        if "apps" not in p.relative_to(PACKAGE).parts and p.name != "__main__.py"
    ]
    assert len(library) > 20
    for path in library:
        bad = {
            m for m in _imports(path) if m.startswith(("sde_diffusion.apps", "hydra", "omegaconf"))
        }
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_importing_the_library_loads_no_app_and_no_hydra():
    code = (
        "import sys, sde_diffusion, sde_diffusion.solvers, sde_diffusion.likelihood; "
        "print(sorted(m for m in sys.modules if m.startswith(('hydra', 'sde_diffusion.apps'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_command_line_names_its_apps():
    run = [sys.executable, "-m", "sde_diffusion"]
    listed = subprocess.run([*run, "--help"], capture_output=True, text=True)
    assert listed.returncode == 0
    for app in ("train", "sample", "report", "likelihood", "demo"):
        assert f"  {app} " in listed.stdout
    bad = subprocess.run([*run, "smaple"], capture_output=True, text=True)
    assert bad.returncode == 2 or bad.returncode == 1
    assert "unknown app 'smaple'" in bad.stderr and "train, sample, report" in bad.stderr
    report = subprocess.run([*run, "report", "--help"], capture_output=True, text=True)
    assert report.returncode == 0 and "sde-diffusion report" in report.stdout


def test_the_console_script_is_the_same_command_line():
    """`sde-diffusion` (installed by pyproject's [project.scripts]) runs the same dispatcher."""
    script = Path(sys.executable).parent / "sde-diffusion"
    assert script.is_file(), "the package is installed without its console script"
    listed = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert listed.returncode == 0 and "usage: sde-diffusion <app>" in listed.stdout
    bad = subprocess.run([str(script), "sample", "sde=foo"], capture_output=True, text=True)
    assert bad.returncode == 1
    assert (
        bad.stderr.strip()
        == "error: unknown sde=foo; valid choices: ddpm, ddpm_scaled_linear, subvp, ve, vp, vp_cosine"
    )
