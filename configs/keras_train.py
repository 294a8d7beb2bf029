"""A custom WGAN-GP critic step for a Keras critic on the torch backend: keras.ops for the maths,
torch for the random draws and the penalty's gradient (as tf.GradientTape takes it in TensorFlow).

Random numbers come from torch, not keras.random, so nanprobe's seed draws the same interpolation
in every precision."""
from __future__ import annotations

import torch
from keras import ops


def critic_step(critic, generator, real, z, lambda_gp: float = 10.0):
    fake = torch.randn_like(real) if generator is None else ops.stop_gradient(generator(z, training=False))
    alpha = torch.rand(real.shape[0], 1, 1, 1)
    x_hat = (alpha * real + (1 - alpha) * fake).detach().requires_grad_(True)
    out = critic(x_hat, training=True)
    grads, = torch.autograd.grad(out, x_hat, grad_outputs=torch.ones_like(out), create_graph=True)
    flat = ops.reshape(grads, (ops.shape(grads)[0], -1))
    norm = ops.sqrt(ops.sum(ops.square(flat), axis=1))
    penalty = lambda_gp * ops.mean(ops.square(norm - 1.0))
    wasserstein = ops.mean(critic(fake, training=True)) - ops.mean(critic(real, training=True))
    return {"loss": wasserstein + penalty, "penalty": penalty, "wasserstein": wasserstein}
