"""A built-in B-mode ultrasound simulator: the default dataset, so every command runs with no data.

Each image is simulated the way a scanner forms one, in miniature:

1. an echogenicity map of breast-like tissue (skin line, subcutaneous fat with lobules, glandular
   tissue with texture, pectoral muscle) with, per class, a lesion:
   * ``normal``: no lesion (hypoechoic fat lobules only, never masked);
   * ``benign``: oval, wider than tall, circumscribed smooth margin, moderately hypoechoic,
     posterior acoustic enhancement;
   * ``malignant``: irregular, spiculated, taller than wide, markedly hypoechoic with an echogenic
     halo, posterior acoustic shadowing;
2. random point scatterers weighted by that map, convolved with a pulse-echo point-spread function
   (Gaussian envelope times a carrier along depth), giving RF lines;
3. envelope detection (Hilbert transform along depth), depth-dependent attenuation partly
   compensated by a time-gain curve, and log compression to a random dynamic range.

Everything is drawn from ``numpy.random.default_rng((seed, class, index))``: the same seed always
gives the same images. The lesion mask comes with each image.
"""
from __future__ import annotations

import numpy as np

CLASSES = ("normal", "benign", "malignant")


def _smooth_field(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """Low-frequency random texture in [-1, 1] (white noise low-passed in Fourier space)."""
    f = np.fft.fftfreq(n)
    fx, fz = np.meshgrid(f, f)
    spectrum = np.exp(-(fx**2 + fz**2) / (2 * scale**2))
    noise = rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))
    field = np.real(np.fft.ifft2(noise * spectrum))
    return field / (np.abs(field).max() + 1e-8)


def _lesion_mask(rng, zz, xx, cls: str):
    cz, cx = rng.uniform(0.38, 0.6), rng.uniform(0.3, 0.7)
    a = rng.uniform(0.09, 0.17)               # lateral half-width
    theta = np.arctan2(zz - cz, xx - cx)
    if cls == "benign":
        b = a * rng.uniform(0.5, 0.8)          # wider than tall
        wobble = 1 + 0.04 * np.sin(2 * theta + rng.uniform(0, 6.28))
    else:
        b = a * rng.uniform(1.0, 1.4)          # taller than wide
        k = rng.integers(7, 14)
        spikes = np.clip(np.sin(k * theta + rng.uniform(0, 6.28)), 0, None) ** 4
        lobes = 0.12 * np.sin(3 * theta + rng.uniform(0, 6.28))
        wobble = 1 + lobes + rng.uniform(0.25, 0.45) * spikes
    r = np.sqrt(((xx - cx) / a) ** 2 + ((zz - cz) / b) ** 2)
    return r <= wobble, r / wobble, (cz, cx, a, b)


def echogenicity(rng: np.random.Generator, n: int, cls: str) -> tuple[np.ndarray, np.ndarray]:
    """Tissue map (linear scattering strength) and lesion mask on an n×n grid (rows = depth)."""
    z = np.linspace(0, 1, n)
    zz, xx = np.meshgrid(z, z, indexing="ij")
    undulate = 0.03 * _smooth_field(rng, n, 0.02)
    skin = 0.04 + rng.uniform(0, 0.02)
    fat = rng.uniform(0.18, 0.28) + undulate
    muscle = rng.uniform(0.78, 0.88) + undulate
    e = np.ones((n, n)) * (1.0 + 0.35 * _smooth_field(rng, n, 0.05))          # glandular
    e = np.where(zz < fat, 0.45 + 0.1 * _smooth_field(rng, n, 0.08), e)        # fat
    e = np.where(zz < skin, 1.8, e)                                            # skin line
    e = np.where(zz > muscle, 0.7 + 0.3 * np.sin(zz * rng.uniform(60, 90)) ** 2, e)  # muscle striations
    # hypoechoic fat lobules in every class (not lesions: never masked)
    for _ in range(rng.integers(1, 4)):
        lz, lx = rng.uniform(skin + 0.03, 0.3), rng.uniform(0.1, 0.9)
        la, lb = rng.uniform(0.05, 0.12), rng.uniform(0.02, 0.04)
        lob = ((xx - lx) / la) ** 2 + ((zz - lz) / lb) ** 2 <= 1
        e = np.where(lob, 0.4, e)
    mask = np.zeros((n, n), bool)
    if cls != "normal":
        mask, rad, (cz, cx, a, b) = _lesion_mask(rng, zz, xx, cls)
        below = (zz > cz) & (np.abs(xx - cx) < a * 0.9)
        fade = np.clip((zz - cz) / 0.5, 0, 1)
        if cls == "benign":
            e = np.where(below & ~mask, e * (1 + rng.uniform(0.3, 0.6) * (1 - fade)), e)   # enhancement
            inside = rng.uniform(0.22, 0.4)
        else:
            e = np.where(below & ~mask, e * rng.uniform(0.2, 0.45), e)                    # shadowing
            halo = (rad > 1.0) & (rad < 1.25)
            e = np.where(halo, e * 1.4, e)
            inside = rng.uniform(0.06, 0.16)
        e = np.where(mask, inside * (1 + 0.3 * _smooth_field(rng, n, 0.1)), e)
    return np.clip(e, 0.01, None), mask


def _psf(n_lat: int, n_ax: int, sigma_lat: float, sigma_ax: float, wavelength: float) -> np.ndarray:
    x = np.arange(n_lat) - n_lat // 2
    z = np.arange(n_ax) - n_ax // 2
    zz, xx = np.meshgrid(z, x, indexing="ij")
    return np.exp(-(xx**2) / (2 * sigma_lat**2) - zz**2 / (2 * sigma_ax**2)) * np.cos(2 * np.pi * zz / wavelength)


def _envelope(rf: np.ndarray) -> np.ndarray:
    """Hilbert-transform envelope along depth (axis 0)."""
    n = rf.shape[0]
    spec = np.fft.fft(rf, axis=0)
    h = np.zeros(n)
    h[0] = 1
    h[1:(n + 1) // 2] = 2
    if n % 2 == 0:
        h[n // 2] = 1
    return np.abs(np.fft.ifft(spec * h[:, None], axis=0))


def simulate(cls: str, seed: int = 0, index: int = 0, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """One B-mode image (float32 in [0, 1], size×size, rows = depth) and its lesion mask (bool)."""
    if cls not in CLASSES:
        raise ValueError(f"phantom class must be one of {CLASSES}, not {cls!r}")
    rng = np.random.default_rng((seed, CLASSES.index(cls), index))
    e, mask = echogenicity(rng, size, cls)
    scatterers = rng.standard_normal((size, size)) * e   # amplitude ∝ echogenicity
    psf = _psf(9, 9, sigma_lat=rng.uniform(1.0, 1.6), sigma_ax=rng.uniform(0.8, 1.2), wavelength=rng.uniform(3, 4.5))
    pad = np.zeros((size, size))
    pad[:9, :9] = psf
    pad = np.roll(pad, (-4, -4), axis=(0, 1))
    rf = np.real(np.fft.ifft2(np.fft.fft2(scatterers) * np.fft.fft2(pad)))
    env = _envelope(rf)
    depth = np.linspace(0, 1, size)[:, None]
    att = rng.uniform(1.0, 3.0)
    tgc = att * rng.uniform(0.6, 1.0)
    env = env * np.exp(-att * depth) * np.exp(tgc * depth)
    dr = rng.uniform(35, 50)
    db = 20 * np.log10(env / (np.percentile(env, 99.5) + 1e-12) + 1e-12)
    img = np.clip((db + dr) / dr, 0, 1) * rng.uniform(0.85, 1.0)
    return img.astype(np.float32), mask


def generate(n_per_class: int, seed: int = 0, size: int = 128, classes=CLASSES):
    """Images (N, size, size) float32, masks (N, size, size) bool, labels (N,) and ids, class-major."""
    images, masks, labels, ids = [], [], [], []
    for k, cls in enumerate(classes):
        for i in range(n_per_class):
            img, m = simulate(cls, seed, i, size)
            images.append(img)
            masks.append(m)
            labels.append(k)
            ids.append(f"phantom:{seed}:{cls}:{i}")
    return np.stack(images), np.stack(masks), np.asarray(labels, np.int64), ids
