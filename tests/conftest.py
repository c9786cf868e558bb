import os

import pytest
import torch

# tiny models run faster (and steadier on a shared 2-core machine) on one intra-op thread
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the subprocesses the tests start


# the tiny phantom run every test file starts from (each adds its own overrides after these)
TINY = ("data.n_per_class=24", "data.image_size=32", "data.phantom_size=64", "data.batch_size=16",
        "model.name=simple_cnn", "model.width=0.25", "train.epochs=1")


def make_cfg(*overrides: str, tiny: bool = True):
    """A composed config: the TINY settings (unless ``tiny=False``), then ``overrides`` (later wins)."""
    from edgeus.config import compose

    return compose([*(TINY if tiny else ()), *overrides])


@pytest.fixture(scope="session")
def small_cfg():
    return make_cfg()


@pytest.fixture(scope="session")
def small_bundle(small_cfg):
    from edgeus.data import build_datasets

    return build_datasets(small_cfg.data)
