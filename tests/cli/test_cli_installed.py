"""The installed ``jit-flux`` console script, run as a user runs it after README's install.

README installs the checkout in editable mode (``pip install --no-build-isolation -e .``) and
then runs ``.venv/bin/jit-flux``. The console script imports ``jit_sampler.cli`` through the
editable finder, which maps only the library packages, and does not put the working
directory on ``sys.path``; calling ``cli.main()`` in-process (tests/cli/test_cli.py) cannot see
what the real script sees. So this test makes the real thing: a throwaway virtual environment
(no pip of its own; it sees this interpreter's site-packages through a path file, for torch
and diffusers, but not their ``.pth`` files, so not the editable install of any other
checkout), this checkout installed into it editable by pip (``--no-deps``, the C++ extension
not rebuilt: the checkout's own ``_C`` is used), and its generated ``bin/jit-flux`` run in a
subprocess from an unrelated directory.
"""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "_host_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {**os.environ, "JIT_KERNELS_BUILD_EXT": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", "-e", str(ROOT)], check=True, env=env)
    exe = venv / "bin" / "jit-flux"
    assert exe.is_file()
    return exe


def run(exe, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_installed_script_runs_the_readme_line(script, tmp_path):
    """README: ``jit-flux --preset 7x`` (the embedded tiny model). Before: "No module named 'jit_eval'"."""
    out = tmp_path / "digit.png"
    r = run(script, "--preset", "7x", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and (tmp_path / "digit.json").is_file()
    # the library packages and the bench both come from this checkout
    probe = subprocess.run([str(script.parent / "python"), "-c",
                            "import jit_sampler, sys; from jit_sampler import cli; cli._tiny_flux_module(); "
                            "print(jit_sampler.__file__); print(sys.modules['jit_eval'].__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                                              if k != "PYTHONPATH"})
    assert probe.returncode == 0, probe.stderr
    lib, bench = probe.stdout.split()
    assert Path(lib).is_relative_to(ROOT) and Path(bench).is_relative_to(ROOT)


def test_installed_script_usage_error(script, tmp_path):
    r = run(script, "--model", "tiny:random", "--prompt", "cat", "--out", str(tmp_path / "x.png"), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("jit-flux: error: ")
