"""A small vision transformer with adder attention (Shu et al., NeurIPS 2021) or dot products.

Shu et al., "Adder Attention for Vision Transformer", NeurIPS 2021, build
vision transformers whose attention compares queries and keys by the adder
similarity ``-sum |q - k|`` with an identity mapping
(:func:`adderjax.nn.adder_attention`), and whose MLPs are adder layers; the
patch embedding stays multiplicative. :class:`ViTTiny` is a small such
network for MNIST-sized images, in the three kinds of :mod:`adderjax.models`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx
from flax.typing import Dtype
import jax
import jax.numpy as jnp

from adderjax.attention import adder_attention
from adderjax.models.layers import Kind, Layers, check_inputs, check_positive_int
from adderjax.ops import ImplementationLike
from adderjax.ops.spec import GradMode

__all__ = ["EncoderBlock", "ViTTiny", "vit_tiny"]


class EncoderBlock(nnx.Module):
  """A pre-norm transformer encoder block: attention and an MLP, each in a residual branch.

  ``x + attention(LayerNorm(x))``, then ``x + BN(fc2(act(BN(fc1(LayerNorm(x))))))``.
  The MLP's layers come from ``make`` (adder, multiplicative or binary), each
  followed by a BatchNorm over the batch and the tokens, as every layer of
  :mod:`adderjax.models`: an adder layer's outputs have a large negative mean
  (about ``-sum |w|``) that a LayerNorm in front of the next layer would not
  remove.

  Args:
    dim: the token width.
    num_heads: the attention heads; must divide ``dim``.
    mlp_dim: the MLP's hidden width.
    make: the model's :class:`adderjax.models.layers.Layers`.
    attention_fn: the attention of :class:`flax.nnx.MultiHeadAttention`.
  """

  def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, make: Layers,
               attention_fn: Callable[..., jax.Array]):
    options = dict(dtype=make.dtype, param_dtype=make.param_dtype, rngs=make.rngs)
    self.norm1 = nnx.LayerNorm(dim, **options)
    self.attention = nnx.MultiHeadAttention(num_heads=num_heads, in_features=dim, decode=False,
                                            attention_fn=attention_fn, **options)
    self.norm2 = nnx.LayerNorm(dim, **options)
    self.fc1 = make.dense(dim, mlp_dim)
    self.bn1 = make.batch_norm(mlp_dim)
    self.fc2 = make.dense(mlp_dim, dim)
    self.bn2 = make.batch_norm(dim)
    self.activation = make.activation

  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps ``(batch, tokens, dim)`` to the same shape."""
    x = x + self.attention(self.norm1(x))
    h = self.activation(self.bn1(self.fc1(self.norm2(x))))
    return x + self.bn2(self.fc2(h))


class ViTTiny(nnx.Module):
  """A small vision transformer (Dosovitskiy et al., ICLR 2021) for MNIST-sized images.

  ``patch embedding (a strided convolution) -> [class token] + position
  embedding -> depth x EncoderBlock -> LayerNorm -> linear head`` on the
  class token. At the defaults, 28x28x1 images in 16 patches of 7x7, 17
  tokens of width 64, 4 blocks of 4 heads and an MLP of 128.

  - ``kind="adder"``: :func:`adderjax.nn.adder_attention` (the adder
    similarity and the identity mapping of Shu et al.) and adder MLPs
    (:class:`adderjax.nn.AdderDense`), each followed by a BatchNorm.
  - ``kind="conv"``: dot-product attention and ordinary MLPs.
  - ``kind="binary"``: dot-product attention and binary MLPs, with HardTanh.

  The patch embedding, the attention's query, key, value and output
  projections and the head stay multiplicative in every kind.

  Example (shapes only: ``nnx.eval_shape`` builds and runs the model abstractly):
    >>> from flax import nnx
    >>> import jax, jax.numpy as jnp
    >>> from adderjax.models import vit_tiny
    >>> model = nnx.eval_shape(lambda: vit_tiny(kind="adder", rngs=nnx.Rngs(0)))
    >>> type(model.blocks[0].fc1).__name__, model.blocks[0].attention.attention_fn.__name__
    ('AdderDense', 'adder_attention')
    >>> images = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
    >>> nnx.eval_shape(lambda model, x: model(x), model, images).shape
    (2, 10)

  Args:
    kind: ``"adder"``, ``"conv"`` or ``"binary"``.
    num_classes: the number of classes.
    image_size: the height and width of the images.
    channels: their channels.
    patch_size: the side of a patch; must divide ``image_size``.
    embed_dim: the token width.
    depth: the number of encoder blocks.
    num_heads: the attention heads; must divide ``embed_dim``.
    mlp_dim: the MLPs' hidden width.
    rngs: rng key.
    dtype: the dtype of the computation (default: infer from input and params).
    param_dtype: the dtype of the parameters (default: float32).
    grad_mode: the adder layers' backward pass (see
      :func:`adderjax.ops.adder_dense`); adder attention's gradient is exact.
    implementation: the adder op's implementation, None for the fastest.

  Raises:
    ValueError: for an unknown ``kind``, ``grad_mode`` or ``implementation``,
      a size that is not a positive int, or sizes that do not divide.
  """

  def __init__(self, *, kind: Kind = "adder", num_classes: int = 10, image_size: int = 28,
               channels: int = 1, patch_size: int = 7, embed_dim: int = 64, depth: int = 4,
               num_heads: int = 4, mlp_dim: int = 128, rngs: nnx.Rngs,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
               grad_mode: GradMode = "full_precision", implementation: ImplementationLike = None):
    sizes = dict(num_classes=num_classes, image_size=image_size, channels=channels,
                 patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                 mlp_dim=mlp_dim)
    sizes = {name: check_positive_int(value, name) for name, value in sizes.items()}
    if sizes["image_size"] % sizes["patch_size"]:
      raise ValueError(f"patch_size must divide image_size={image_size}, got "
                       f"patch_size={patch_size}.")
    if sizes["embed_dim"] % sizes["num_heads"]:
      raise ValueError(f"num_heads must divide embed_dim={embed_dim}, got num_heads={num_heads}.")
    make = Layers(kind=kind, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                  grad_mode=grad_mode, implementation=implementation)
    tokens = (image_size // patch_size) ** 2 + 1
    self.patch_embed = make.conv(channels, embed_dim, patch_size, patch_size, padding="VALID",
                                 use_bias=True, kind="conv")
    self.cls_token = nnx.Param(jnp.zeros((1, 1, embed_dim), param_dtype))
    self.pos_embed = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (1, tokens, embed_dim), param_dtype))
    attention_fn = adder_attention if kind == "adder" else nnx.dot_product_attention
    self.blocks = nnx.List([
        EncoderBlock(embed_dim, num_heads, mlp_dim, make=make, attention_fn=attention_fn)
        for _ in range(depth)])
    self.norm = nnx.LayerNorm(embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.head = make.dense(embed_dim, num_classes, use_bias=True, kind="conv")
    self.kind = kind
    self.num_classes = num_classes
    self.image_size = image_size
    self.channels = channels

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Classifies a batch.

    Args:
      inputs: ``(batch, image_size, image_size, channels)`` images.

    Returns:
      ``(batch, num_classes)`` logits.
    """
    check_inputs(inputs, channels=self.channels, spatial=(self.image_size, self.image_size))
    x = self.patch_embed(inputs)
    x = jnp.reshape(x, (x.shape[0], -1, x.shape[-1]))
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(x.dtype)
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x[:, 0]))


def vit_tiny(**kwargs: Any) -> ViTTiny:
  """A small vision transformer for MNIST; keyword arguments as :class:`ViTTiny`.

  Example:
    >>> from flax import nnx
    >>> from adderjax.models import vit_tiny
    >>> model = nnx.eval_shape(lambda: vit_tiny(kind="conv", depth=2, rngs=nnx.Rngs(0)))
    >>> len(model.blocks), model.pos_embed.shape
    (2, (1, 17, 64))
  """
  return ViTTiny(**kwargs)
