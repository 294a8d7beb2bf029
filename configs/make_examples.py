"""Regenerate the example configs' binary inputs (deterministic): python configs/make_examples.py

- data/drifted_critic.pt: a DCGANCritic state_dict whose output bias has drifted to 7e4. WGAN and
  hinge losses do not constrain a critic's constant offset, so over a long run it random-walks
  into the last layer's bias (ProGAN added a drift penalty for this).
- data/corrupt_batch.npy: 24 images in [-1, 1], with NaN pixels in sample 5 (a broken decode).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from models import DCGANCritic

HERE = Path(__file__).resolve().parent


def main() -> None:
    out = HERE / "data"
    out.mkdir(exist_ok=True)
    torch.manual_seed(0)
    critic = DCGANCritic(img=32, ch=32, init_std=None)
    last = critic.net[-2]
    with torch.no_grad():
        last.bias.fill_(7.0e4)
    torch.save({"critic": critic.state_dict()}, out / "drifted_critic.pt")

    rng = np.random.default_rng(0)
    batch = rng.uniform(-1, 1, size=(24, 3, 32, 32)).astype(np.float32)
    batch[5, :, 10:14, 10:14] = np.nan
    np.save(out / "corrupt_batch.npy", batch)


if __name__ == "__main__":
    main()
