"""Real-model trunks for ``gradlens bench --zoo``: Hugging Face transformers' own classes.

Each trunk is built from a tiny configuration of a model class of ``transformers`` (random
initialisation, nothing downloaded; dropout off), wrapped so that it returns one feature vector
per example for the task heads: BERT and T5's encoder (token ids, length 32), GPT-2 (its own
``Conv1D`` layers), ViT, ResNet, ConvNeXt and MobileNetV2 (32 x 32 images). ``transformers`` is
the ``zoo`` extra; it is imported only when a zoo trunk is built.

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

import torch
from torch import nn

from gradlens._errors import GradlensError

__all__ = ["ZOO", "build_zoo", "zoo_input"]

_VOCAB = 512
_SEQ = 32
_IMAGE = 32


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


def _bert() -> nn.Module:
    import transformers as tf

    cfg = tf.BertConfig(
        vocab_size=_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return HFTrunk(tf.BertModel(cfg, add_pooling_layer=False), "first")


def _gpt2() -> nn.Module:
    import transformers as tf

    cfg = tf.GPT2Config(
        vocab_size=_VOCAB, n_embd=64, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return HFTrunk(tf.GPT2Model(cfg), "last")


def _t5() -> nn.Module:
    import transformers as tf

    cfg = tf.T5Config(
        vocab_size=_VOCAB, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2,
        dropout_rate=0.0,
    )
    return HFTrunk(tf.T5EncoderModel(cfg), "mean")


def _vit() -> nn.Module:
    import transformers as tf

    cfg = tf.ViTConfig(
        image_size=_IMAGE, patch_size=8, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=128, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return HFTrunk(tf.ViTModel(cfg, add_pooling_layer=False), "first")


def _resnet() -> nn.Module:
    import transformers as tf

    cfg = tf.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic"
    )
    return HFTrunk(tf.ResNetModel(cfg), "pool")


def _convnext() -> nn.Module:
    import transformers as tf

    cfg = tf.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], image_size=_IMAGE)
    return HFTrunk(tf.ConvNextModel(cfg), "pool")


def _mobilenetv2() -> nn.Module:
    import transformers as tf

    cfg = tf.MobileNetV2Config(depth_multiplier=0.35, image_size=_IMAGE)
    return HFTrunk(tf.MobileNetV2Model(cfg), "pool")


#: name -> (trunk factory, input kind: "tokens" or "image")
ZOO: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "bert": (_bert, "tokens"),
    "gpt2": (_gpt2, "tokens"),
    "t5-encoder": (_t5, "tokens"),
    "vit": (_vit, "image"),
    "resnet": (_resnet, "image"),
    "convnext": (_convnext, "image"),
    "mobilenetv2": (_mobilenetv2, "image"),
}


def zoo_input(name: str, batch: int) -> torch.Tensor:
    """A random batch for zoo trunk ``name``: token ids (batch x 32) or images (batch x 3 x 32
    x 32)."""
    if ZOO[name][1] == "tokens":
        return torch.randint(0, _VOCAB, (batch, _SEQ))
    return torch.randn(batch, 3, _IMAGE, _IMAGE)


def build_zoo(name: str) -> tuple[nn.Module, Callable[[int], torch.Tensor]]:
    """``(trunk, make_x)`` for zoo trunk ``name`` (needs ``transformers``: the ``zoo`` extra)."""
    if name not in ZOO:
        raise GradlensError(f"`model` should be one of {sorted(ZOO)}; found {name!r}.")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise GradlensError(
            f"the zoo trunk {name!r} needs Hugging Face transformers: pip install "
            "'gradlens[zoo]'."
        ) from None
    return ZOO[name][0](), lambda b: zoo_input(name, b)
