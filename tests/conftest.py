"""Shared fixtures (the helpers they use live in tests/helpers/), and the guard that keeps `make test-fast` fast:
a test that starts a subprocess must be marked `slow`."""

import contextlib
import subprocess

import pytest
import torch

from helpers.tiny_models import tiny_model

torch.set_num_threads(2)


@contextlib.contextmanager
def subprocesses_refused(item):
    """While a test not marked `slow` sets up or runs, starting a subprocess fails with a message saying so."""
    if item.get_closest_marker("slow") is not None:
        yield
        return
    original = subprocess.Popen.__init__

    def refuse(self, *args, **kwargs):
        raise RuntimeError(f"{item.nodeid} starts a subprocess ({args[0] if args else kwargs.get('args')!r}): mark it "
                           "@pytest.mark.slow, so `make test-fast` stays fast")

    subprocess.Popen.__init__ = refuse
    try:
        yield
    finally:
        subprocess.Popen.__init__ = original


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with subprocesses_refused(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with subprocesses_refused(item):
        return (yield)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A complete tiny checkpoint folder written by `leo-mini build --preset tiny --random-init`."""
    from leo_mini_hf.cli import main

    folder = tmp_path_factory.mktemp("checkpoints") / "tiny"
    main(["build", "--preset", "tiny", "--random-init", "--out", str(folder)])
    return folder


@pytest.fixture(scope="session")
def tiny_processor(tiny_checkpoint):
    from leo_mini_hf import LeoMiniProcessor

    return LeoMiniProcessor.from_pretrained(tiny_checkpoint)
