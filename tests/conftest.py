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


# a tiny compress run with every stage and a bundle (predict, viewer): no report, no robustness
SMALL_RUN = ("recipe=rsmas_int8", "model.name=simple_cnn", "prune.finetune_epochs=1", "decompose.finetune_epochs=1",
             "quantize.qat=false", "compress.latency_iters=2", "compress.robustness=false", "compress.report=false",
             "gates.enforce=false")


def small_run(out):
    from edgeus.pipeline.runner import compress

    compress(make_cfg(*SMALL_RUN, f"out={out}"))
    return out


def phantom_pngs(d, n_per_class: int, seed: int, name: str = "{cls}_{i}"):
    """Phantom scans saved as PNG files in ``d``, a BUSI-style ``<name>_mask.png`` beside each lesion."""
    from PIL import Image

    from edgeus.data import phantom

    imgs, masks, labels, _ = phantom.generate(n_per_class, seed, 64, list(phantom.CLASSES))
    for i, (im, m, y) in enumerate(zip(imgs, masks, labels)):
        stem = name.format(cls=phantom.CLASSES[y], i=i)
        Image.fromarray((im * 255).astype("uint8")).save(d / f"{stem}.png")
        if m.any():
            Image.fromarray((m * 255).astype("uint8")).save(d / f"{stem}_mask.png")
    return d


def fail_every_gate(monkeypatch):
    """Make the ECE gate fail whatever the student does (a negative tolerance is refused at compose)."""
    from omegaconf import OmegaConf

    from edgeus.pipeline import gates as G

    real = G.check
    monkeypatch.setattr(G, "check", lambda stage, t, s, gates, classes, *a, **k: real(
        stage, t, s, OmegaConf.merge(gates, {"max_ece_rise": -1.0}), classes, *a, **k))
