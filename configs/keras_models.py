"""Keras 3 versions of the example GAN models: the DCGAN-style critic and generator of models.py,
written as a Keras user writes them (functional models, channels-last). nanprobe runs them on the
torch backend; nothing here imports torch."""
from __future__ import annotations

import keras
from keras import layers


def _kernel_init(init_std: float | None):
    # DCGAN's recipe is N(0, 0.02); None keeps Keras's default, GlorotUniform.
    return "glorot_uniform" if init_std is None else keras.initializers.RandomNormal(0.0, init_std, seed=0)


def dcgan_critic(img: int = 32, ch: int = 32, extra: int = 0, init_std: float | None = 0.02,
                 channels: int = 3, score_fp32: bool = True) -> keras.Model:
    """WGAN-GP critic: strided 4x4 convs with LeakyReLU(0.2), optional 3x3 convs per stage, no batch norm."""
    init = _kernel_init(init_std)
    inputs = keras.Input((img, img, channels), name="image")
    x, c, size = inputs, ch, img
    while size > 4:
        x = layers.Conv2D(c, 4, strides=2, padding="same", kernel_initializer=init, name=f"down{size}")(x)
        x = layers.LeakyReLU(0.2, name=f"act{size}")(x)
        for i in range(extra):
            x = layers.Conv2D(c, 3, padding="same", kernel_initializer=init, name=f"conv{size}_{i}")(x)
            x = layers.LeakyReLU(0.2, name=f"act{size}_{i}")(x)
        c, size = c * 2, size // 2
    x = layers.Conv2D(1, 4, padding="valid", kernel_initializer=init, name="conv_out")(x)
    x = layers.Flatten(name="flatten")(x)
    # The Keras mixed-precision guide keeps the model's output in float32.
    score = layers.Activation("linear", dtype="float32" if score_fp32 else None, name="score")(x)
    return keras.Model(inputs, score, name="critic")


def dcgan_generator(latent_dim: int = 64, img: int = 32, ch: int = 32, channels: int = 3) -> keras.Model:
    """DCGAN generator: a dense projection of z to 4x4, then transposed convs to the image size, tanh."""
    stages = max(0, (img // 4).bit_length() - 1)
    c = ch * 2 ** max(stages - 1, 0)
    z = keras.Input((latent_dim,), name="z")
    x = layers.Dense(4 * 4 * c, activation="relu", name="project")(z)
    x = layers.Reshape((4, 4, c))(x)
    for i in range(stages - 1):
        c //= 2
        x = layers.Conv2DTranspose(c, 4, strides=2, padding="same", name=f"up{i}")(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.ReLU()(x)
    x = layers.Conv2DTranspose(channels, 4, strides=2, padding="same", name="to_rgb")(x)
    out = layers.Activation("tanh", dtype="float32", name="image")(x)
    return keras.Model(z, out, name="generator")
