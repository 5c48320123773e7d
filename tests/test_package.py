"""Packaging: the import is quiet about jaxopt only, and both entry points work."""

import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_import_hides_exactly_the_jaxopt_deprecation():
    out = _run("-W", "always::DeprecationWarning", "-c", "import recon_jax, recon_jax.solvers")
    assert out.returncode == 0, out.stderr
    assert "JAXopt is no longer maintained" not in out.stderr


def test_other_deprecation_warnings_still_show():
    code = ("import warnings, recon_jax, recon_jax.solvers; "
            "warnings.warn('some other deprecation', DeprecationWarning); "
            "print(sum(1 for f in warnings.filters if f[0] == 'ignore' and f[1] is not None "
            "and f[1].pattern.startswith('JAXopt')))")
    out = _run("-W", "always::DeprecationWarning", "-c", code)
    assert out.returncode == 0, out.stderr
    assert "some other deprecation" in out.stderr
    assert out.stdout.strip() == "1"


def test_module_entry_point_and_console_script():
    out = _run("-m", "recon_jax", "--help")
    assert out.returncode == 0 and "train" in out.stdout and "reconstruct" in out.stdout
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("recon-jax") == "recon_jax.cli:main"
