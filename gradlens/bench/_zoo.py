"""Real-model trunks for ``gradlens bench --zoo``: Hugging Face transformers' own classes.

Each trunk is built from a configuration of a model class of ``transformers`` (random
initialisation, nothing downloaded; dropout off), wrapped so that it returns one feature vector
per example for the task heads: BERT and T5's encoder (token ids), GPT-2 (its own ``Conv1D``
layers), ViT, ResNet, ConvNeXt and MobileNetV2 (images). Two sizes (:data:`SIZES`): "small",
tiny configurations (hidden 64, length 32, 32 x 32 images: the default), and "base", a modest
realistic size (hidden 256, 4 heads, length 64, 64 x 64 images, CNN stages twice as wide:
1-2M parameters a trunk, a probe at T = 8 and batch 8 under a second of one CPU thread).
``transformers`` is the ``zoo`` extra; it is imported only when a zoo trunk is built.

Example:
    >>> import importlib.util
    >>> sorted(ZOO)
    ['bert', 'convnext', 'gpt2', 'mobilenetv2', 'resnet', 't5-encoder', 'vit']
    >>> if importlib.util.find_spec("transformers"):
    ...     trunk, make_x = build_zoo("bert")
    ...     tuple(trunk(make_x(2)).shape)
    ... else:
    ...     (2, 64)
    (2, 64)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gradlens._errors import GradlensError

__all__ = ["SIZES", "ZOO", "ZOO_BATCH", "build_zoo", "check_size", "zoo_input"]

#: ``gradlens bench --zoo --size``: "small" the tiny configurations (the default), "base" each
#: Hugging Face trunk at a modest realistic size (see :data:`_DIMS`)
SIZES = ("small", "base")

#: the zoo's batch at each size, unless given: at "base", 8 keeps a transformer trunk's probe at
#: T = 8 under a second of one CPU thread (0.4-0.6 s), a realistic batch for it
ZOO_BATCH = {"small": 4, "base": 8}


@dataclass(frozen=True)
class _Dims:
    """The dimensions of the zoo trunks at one size."""

    vocab: int  # token vocabulary
    seq: int  # token sequence length
    image: int  # image side (pixels)
    width: int  # transformers' hidden size
    heads: int  # transformers' attention heads
    ffn: int  # transformers' feed-forward width
    kv: int  # T5's width per attention head
    stages: tuple[int, int, int, int]  # ResNet and ConvNeXt stage widths
    mobilenet: float  # MobileNetV2's depth multiplier


#: small: hidden 64, 2 heads, length 32, 32 x 32 images; base: BERT-mini-like widths (hidden 256,
#: 4 heads, 2 layers, length 64, a 2048-token vocabulary), 64 x 64 images, CNN stages twice as
#: wide, MobileNetV2 at half width (see the README's Performance section for why these)
_DIMS = {
    "small": _Dims(512, 32, 32, 64, 2, 128, 32, (16, 32, 64, 128), 0.35),
    "base": _Dims(2048, 64, 64, 256, 4, 1024, 64, (32, 64, 128, 256), 0.5),
}


def check_size(size: object) -> str:
    """``size`` if it names a zoo size, else a GradlensError.

    Example:
        >>> check_size("base")
        'base'
    """
    if not isinstance(size, str) or size not in SIZES:
        raise GradlensError(
            f"`size` should be one of {list(SIZES)} (the zoo trunks' dimensions); found {size!r}."
        )
    return size


class HFTrunk(nn.Module):
    """A transformers model returning one feature vector per example (see ``pick``)."""

    def __init__(self, model: nn.Module, pick: str) -> None:
        super().__init__()
        self.model = model
        self.pick = pick

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.pick == "first":
            return out.last_hidden_state[:, 0]
        if self.pick == "last":
            return out.last_hidden_state[:, -1]
        if self.pick == "mean":
            return out.last_hidden_state.mean(1)
        return out.pooler_output.flatten(1)


def _bert(d: _Dims) -> nn.Module:
    import transformers as tf

    cfg = tf.BertConfig(
        vocab_size=d.vocab, hidden_size=d.width, num_hidden_layers=2, num_attention_heads=d.heads,
        intermediate_size=d.ffn,
        max_position_embeddings=max(64, d.seq), hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return HFTrunk(tf.BertModel(cfg, add_pooling_layer=False), "first")


def _gpt2(d: _Dims) -> nn.Module:
    import transformers as tf

    cfg = tf.GPT2Config(
        vocab_size=d.vocab, n_embd=d.width, n_layer=2, n_head=d.heads, n_positions=max(64, d.seq),
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return HFTrunk(tf.GPT2Model(cfg), "last")


def _t5(d: _Dims) -> nn.Module:
    import transformers as tf

    cfg = tf.T5Config(
        vocab_size=d.vocab, d_model=d.width, d_kv=d.kv, d_ff=d.ffn, num_layers=2, num_heads=d.heads,
        dropout_rate=0.0,
    )  # fmt: skip
    return HFTrunk(tf.T5EncoderModel(cfg), "mean")


def _vit(d: _Dims) -> nn.Module:
    import transformers as tf

    cfg = tf.ViTConfig(
        image_size=d.image, patch_size=8, hidden_size=d.width, num_hidden_layers=2,
        num_attention_heads=d.heads, intermediate_size=d.ffn,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return HFTrunk(tf.ViTModel(cfg, add_pooling_layer=False), "first")


def _resnet(d: _Dims) -> nn.Module:
    import transformers as tf

    cfg = tf.ResNetConfig(
        embedding_size=d.stages[0], hidden_sizes=list(d.stages), depths=[1, 1, 1, 1],
        layer_type="basic",
    )  # fmt: skip
    return HFTrunk(tf.ResNetModel(cfg), "pool")


def _convnext(d: _Dims) -> nn.Module:
    import transformers as tf

    cfg = tf.ConvNextConfig(hidden_sizes=list(d.stages), depths=[1, 1, 1, 1], image_size=d.image)
    return HFTrunk(tf.ConvNextModel(cfg), "pool")


def _mobilenetv2(d: _Dims) -> nn.Module:
    import transformers as tf

    cfg = tf.MobileNetV2Config(depth_multiplier=d.mobilenet, image_size=d.image)
    return HFTrunk(tf.MobileNetV2Model(cfg), "pool")


#: name -> (trunk factory, input kind: "tokens" or "image")
ZOO: dict[str, tuple[Callable[[_Dims], nn.Module], str]] = {
    "bert": (_bert, "tokens"),
    "gpt2": (_gpt2, "tokens"),
    "t5-encoder": (_t5, "tokens"),
    "vit": (_vit, "image"),
    "resnet": (_resnet, "image"),
    "convnext": (_convnext, "image"),
    "mobilenetv2": (_mobilenetv2, "image"),
}


def zoo_input(name: str, batch: int, size: str = "small") -> torch.Tensor:
    """A random batch for zoo trunk ``name`` at ``size``: token ids (batch x length) or images
    (batch x 3 x side x side)."""
    d = _DIMS[check_size(size)]
    if ZOO[name][1] == "tokens":
        return torch.randint(0, d.vocab, (batch, d.seq))
    return torch.randn(batch, 3, d.image, d.image)


def build_zoo(name: str, size: str = "small") -> tuple[nn.Module, Callable[[int], torch.Tensor]]:
    """``(trunk, make_x)`` for zoo trunk ``name`` at ``size`` (one of :data:`SIZES`; needs
    ``transformers``: the ``zoo`` extra)."""
    if name not in ZOO:
        raise GradlensError(f"`model` should be one of {sorted(ZOO)}; found {name!r}.")
    check_size(size)
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise GradlensError(
            f"the zoo trunk {name!r} needs Hugging Face transformers: pip install "
            "'gradlens[zoo]'."
        ) from None
    return ZOO[name][0](_DIMS[size]), lambda b: zoo_input(name, b, size)
