"""Are generated digits recognisable? A classifier trained on the real digits judges them.

The classifier (a logistic regression) is trained on sklearn's real digits brought to the generator's
resolution exactly as the training pipeline brings them (8x8 PNG -> bilinear resize), so real
and generated images are judged in the same space. Reported: the fraction of samples it is
confident about, the classes covered and the class histogram; the same numbers for held-out
real digits are the reference.
"""

from __future__ import annotations

import numpy as np
import torch


def real_digits(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """The real digits as (N, resolution * resolution) features in [-1, 1], as training sees them."""
    from PIL import Image

    from distgan.data import builtin

    x, y, _ = builtin.load("digits")
    out = np.stack(
        [np.asarray(Image.fromarray(img[..., 0]).resize((resolution, resolution), Image.BILINEAR)) for img in x]
    )
    return out.reshape(len(x), -1).astype(np.float32) / 127.5 - 1.0, y


def split(resolution: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, x_test, y_train, y_test): the real digits (as `real_digits`) split 3:1, stratified by
    class; the judges (this classifier and metrics.fid.DigitFeatures) train on the first part."""
    from sklearn.model_selection import train_test_split

    x, y = real_digits(resolution)
    return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)


def fit_classifier(resolution: int, seed: int = 0):
    from sklearn.linear_model import LogisticRegression

    x_train, x_test, y_train, y_test = split(resolution, seed)
    clf = LogisticRegression(C=1.0, max_iter=5000).fit(x_train, y_train)
    return clf, x_test, y_test


def to_features(images: torch.Tensor) -> np.ndarray:
    """(N, 1, H, W) in [-1, 1] -> (N, H * W)."""
    return images.float().clamp(-1, 1).reshape(len(images), -1).numpy()


def summarize(probs: np.ndarray, threshold: float = 0.9) -> dict:
    pred = probs.argmax(1)
    conf = probs.max(1)
    confident = conf >= threshold
    hist = np.bincount(pred[confident], minlength=10)
    return {
        "n": int(len(probs)),
        "confident_fraction": float(confident.mean()),
        "mean_max_prob": float(conf.mean()),
        "classes_covered": int((hist > 0).sum()),
        "min_class_fraction": float(hist.min() / max(confident.sum(), 1)),
        "class_histogram": hist.tolist(),
    }


def evaluate(images: torch.Tensor, threshold: float = 0.9, seed: int = 0) -> dict:
    """Quality of generated digits, next to the same figures for held-out real digits."""
    clf, x_test, y_test = fit_classifier(images.shape[-1], seed)
    fake = summarize(clf.predict_proba(to_features(images)), threshold)
    real = summarize(clf.predict_proba(x_test), threshold)
    real["accuracy"] = float((clf.predict(x_test) == y_test).mean())
    return {"generated": fake, "real_heldout": real, "threshold": threshold}
