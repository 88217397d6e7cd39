"""Writes tests/fixtures/vanilla_vae_parity.npz: a small PyTorch VanillaVAE and what it computes.

Requires torch (never a jaxvae dependency); run once by hand:

    /tmp/venv/bin/python scripts/make_parity_fixture.py [out.npz]

The PyTorch model below is the PyTorch-VAE VanillaVAE architecture written out here with its
sizes as arguments (the original hard-codes a 2x2 bottleneck for 64x64 inputs and 3 output
channels): hidden dims (8, 16), latent 4, 16x16x3 images, so the bottleneck is 16 x 4 x 4 -- larger
than 1x1, which is what exposes a wrong flatten order (PyTorch flattens (c, h, w), Flax (h, w, c)).

The weights are drawn in float32 (BatchNorm affine parameters and running statistics too, so
their conversion is exercised). The forward passes run in float64 on those same float32 values,
so the saved outputs are the exact function of the saved float32 weights, up to float64 rounding;
a float32 re-implementation should then agree to ~1e-6.

Saved arrays (PyTorch layouts: images NCHW):
  sd/<key>                state_dict before any forward (num_batches_tracked included)
  x [N, C, H, W], eps [N, D]          input batch and the fixed reparameterisation noise
  eval_recons, eval_mu, eval_log_var  eval-mode forward (running statistics) with eps
  train_recons, train_mu, train_log_var  train-mode forward (batch statistics) with eps
  loss, recons_loss, kld, kld_weight  the seed's loss_function on the train-mode forward
                                      (kld is the positive batch-mean KL)
  after/<key>             BatchNorm running_mean / running_var / num_batches_tracked after the
                          train-mode forward (PyTorch updates running_var with the UNBIASED
                          batch variance)
  hidden_dims, latent_dim, image_size metadata
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

HIDDEN_DIMS = (8, 16)
LATENT_DIM = 4
IMAGE_SIZE = 16
CHANNELS = 3
BATCH = 4
KLD_WEIGHT = 0.005
SEED = 0


class TorchVanillaVAE(nn.Module):
    """PyTorch-VAE's VanillaVAE with a computed bottleneck and ``in_channels`` outputs."""

    def __init__(self, in_channels: int, latent_dim: int, hidden_dims, image_size: int):
        super().__init__()
        hidden = list(hidden_dims)
        self.bottleneck = image_size // 2 ** len(hidden)
        self.last_dim = hidden[-1]
        flat = hidden[-1] * self.bottleneck**2

        blocks, cin = [], in_channels
        for h in hidden:
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(cin, h, kernel_size=3, stride=2, padding=1),
                    nn.BatchNorm2d(h),
                    nn.LeakyReLU(),
                )
            )
            cin = h
        self.encoder = nn.Sequential(*blocks)
        self.fc_mu = nn.Linear(flat, latent_dim)
        self.fc_var = nn.Linear(flat, latent_dim)

        self.decoder_input = nn.Linear(latent_dim, flat)
        rev = hidden[::-1]
        self.decoder = nn.Sequential(
            *[
                nn.Sequential(
                    nn.ConvTranspose2d(
                        rev[i], rev[i + 1], 3, stride=2, padding=1, output_padding=1
                    ),
                    nn.BatchNorm2d(rev[i + 1]),
                    nn.LeakyReLU(),
                )
                for i in range(len(rev) - 1)
            ]
        )
        self.final_layer = nn.Sequential(
            nn.ConvTranspose2d(rev[-1], rev[-1], 3, stride=2, padding=1, output_padding=1),
            nn.BatchNorm2d(rev[-1]),
            nn.LeakyReLU(),
            nn.Conv2d(rev[-1], in_channels, kernel_size=3, padding=1),
            nn.Tanh(),
        )

    def encode(self, x):
        h = torch.flatten(self.encoder(x), start_dim=1)  # (c, h, w) order
        return self.fc_mu(h), self.fc_var(h)

    def decode(self, z):
        h = self.decoder_input(z).view(-1, self.last_dim, self.bottleneck, self.bottleneck)
        return self.final_layer(self.decoder(h))

    def forward(self, x, eps):
        mu, log_var = self.encode(x)
        z = eps * torch.exp(0.5 * log_var) + mu
        return self.decode(z), mu, log_var


def seed_loss(recons, x, mu, log_var, kld_weight):
    """VanillaVAE.loss_function: MSE mean + kld_weight * batch-mean KL (positive)."""
    recons_loss = F.mse_loss(recons, x)
    kld = torch.mean(-0.5 * torch.sum(1 + log_var - mu**2 - log_var.exp(), dim=1), dim=0)
    return recons_loss + kld_weight * kld, recons_loss, kld


def main(out_path: Path) -> None:
    torch.manual_seed(SEED)
    model = TorchVanillaVAE(CHANNELS, LATENT_DIM, HIDDEN_DIMS, IMAGE_SIZE)
    # Non-trivial BatchNorm affine parameters and running statistics.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    state_dict = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}

    x32 = torch.rand(BATCH, CHANNELS, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1
    eps32 = torch.randn(BATCH, LATENT_DIM)
    model = model.double()
    x, eps = x32.double(), eps32.double()

    with torch.no_grad():
        model.eval()
        eval_recons, eval_mu, eval_log_var = model(x, eps)
        model.train()
        train_recons, train_mu, train_log_var = model(x, eps)
        loss, recons_loss, kld = seed_loss(train_recons, x, train_mu, train_log_var, KLD_WEIGHT)

    arrays = {f"sd/{k}": v for k, v in state_dict.items()}
    arrays.update(
        {
            f"after/{k}": v.detach().numpy().copy()
            for k, v in model.state_dict().items()
            if "running" in k or "num_batches_tracked" in k
        }
    )
    arrays.update(
        x=x32.numpy(),
        eps=eps32.numpy(),
        eval_recons=eval_recons.numpy(),
        eval_mu=eval_mu.numpy(),
        eval_log_var=eval_log_var.numpy(),
        train_recons=train_recons.numpy(),
        train_mu=train_mu.numpy(),
        train_log_var=train_log_var.numpy(),
        loss=loss.numpy(),
        recons_loss=recons_loss.numpy(),
        kld=kld.numpy(),
        kld_weight=np.float64(KLD_WEIGHT),
        hidden_dims=np.array(HIDDEN_DIMS),
        latent_dim=np.int64(LATENT_DIM),
        image_size=np.int64(IMAGE_SIZE),
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_path, **arrays)
    print(f"wrote {out_path} ({out_path.stat().st_size} bytes, {len(arrays)} arrays)")


if __name__ == "__main__":
    default = Path(__file__).resolve().parents[1] / "tests/fixtures/vanilla_vae_parity.npz"
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
