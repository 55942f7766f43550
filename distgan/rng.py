"""Every RNG state of a process as int64 tensors (so they can be gathered and saved), and back."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_state() -> dict[str, torch.Tensor]:
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().to(torch.int64),
        "python": torch.tensor([version, *py_state], dtype=torch.int64),
        "python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
        "numpy": torch.tensor([np_pos, np_has_gauss, *np_keys.tolist()], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().to(torch.int64)
    return state


def set_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    py = state["python"].tolist()
    has_gauss, gauss = state["python_gauss"].tolist()
    random.setstate((py[0], tuple(py[1:]), gauss if has_gauss else None))
    npv = state["numpy"].tolist()
    np.random.set_state(("MT19937", np.array(npv[2:], dtype=np.uint32), npv[0], npv[1], state["numpy_gauss"].item()))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8).cpu())


@contextlib.contextmanager
def preserved():
    """Run a block without changing any RNG of this process (Python, numpy, torch, CUDA): sample
    grids and evaluations run on rank 0 only, and at steps a resumed run does not share, so they
    must not move the training RNG (else a resume is not exact)."""
    state = get_state()
    try:
        yield
    finally:
        set_state(state)
