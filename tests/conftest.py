"""Shared fixtures: the SDE family with default parameters, and deterministic generators."""

from __future__ import annotations

import pytest
import torch

from sde_diffusion import VESDE, VPSDE, CosineVPSDE, DiscreteVPSDE, SubVPSDE

ALL_SDES = {
    "vp": VPSDE,
    "vp_cosine": CosineVPSDE,
    "subvp": SubVPSDE,
    "ve": VESDE,
    "ddpm": DiscreteVPSDE.ddpm,
}


@pytest.fixture(params=list(ALL_SDES), ids=list(ALL_SDES))
def any_sde(request):
    """Each SDE of the family with its default parameters."""
    return ALL_SDES[request.param]()


@pytest.fixture(params=[torch.float32, torch.float64], ids=["f32", "f64"])
def dtype(request):
    return request.param


def pytest_collection_modifyitems(config, items):
    """Every test marked `gpu` is skipped, with one stated reason, where CUDA is absent: the
    marker says what a test needs, and this is the one place that decides whether it runs."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (none on this machine; run pytest -m gpu on one)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint():
    """make(out_dir, data, n, *overrides): a checkpoint of a tiny MLP trained for 6 steps on
    `data` (n samples) by the train app, with Hydra overrides."""
    from sde_diffusion.apps import train

    def make(out_dir, data, n, *overrides):
        cfg = train.compose_config(
            [
                f"data={data}", f"data.n={n}", "model.width=16", "model.depth=1",
                "model.embed_dim=8", "train.steps=6", "train.batch_size=32", "train.log_every=3",
                "train.sample_every=-1", "train.device=cpu", "train.progress=false",
                "train.tensorboard=false", *overrides,
            ]
        )  # fmt: skip
        return train.run(cfg, out_dir).last_checkpoint

    return make


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread: the tests use small tensors, where extra threads only add overhead and
    oversubscribe a small CI machine. Session-wide, so that module and session fixtures (the
    digits classifier that a test retrains and compares bit for bit) run with it too."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _one_torch_thread_after_each_test(_one_torch_thread):
    """Back to one thread after each test: a test that runs a benchmark's main() (which sets
    torch's thread count) leaves the next test, and the next module's fixtures, their single
    thread."""
    yield
    torch.set_num_threads(1)
