import logging

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def structured_matrix(n_out=96, n_in=128, seed=0, sharpness=8.0):
    """A full-rank matrix with simple nonlinear structure: staircase-like sigmoid(s*(x_i + y_j))
    mixtures. Its singular values decay slowly, so truncated SVD needs a high rank for it."""
    g = np.random.default_rng(seed)
    W = np.zeros((n_out, n_in))
    for _ in range(3):
        x, y = g.normal(size=n_out), g.normal(size=n_in)
        W += g.normal() / (1 + np.exp(-sharpness * (x[:, None] + y[None, :])))
    return (W - W.mean()).astype(np.float32)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.WARNING, logger="riem_compiler")
