"""Importing the package and loading the embedded model prints nothing (jit_sampler._notices).

With the test extras installed (torchao older than torch among them), diffusers' import
otherwise prints torchao / torch / transformers notices to stderr before the README's
main job writes a line.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
from jit_eval.tiny_flux import load_tiny_flux
load_tiny_flux("tiny")
from jit_sampler.pipelines import JiTFluxPipeline, enable_jit
from diffusers import TorchAoConfig
"""


@pytest.mark.slow
def test_import_and_model_load_are_silent():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == "", out.stdout + out.stderr


def test_notice_filters_drop_only_their_notices():
    import logging

    from jit_sampler import _notices

    _notices.install()
    log = logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer")

    def passes(msg):
        rec = log.makeRecord(log.name, logging.WARNING, __file__, 1, msg, (), None)
        return all(f.filter(rec) for f in log.filters)

    assert not passes("Unable to import `torchao` Tensor objects. This may affect loading checkpoints")
    assert passes("some other warning a user must see")
