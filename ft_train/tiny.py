"""Tiny random weights in the real folder layouts, for the tests and ``ft-demo`` on CPU.

Each folder or file is written with the libraries' own ``save_pretrained`` / ``torch.save`` in
the layout the real weights come in, so it loads back through the same loaders and checks as
real weights; only the sizes are small. The numbers they give show that the code runs, not
quality.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import CONF_DIR
from .models.encoders import AUDIO_RATE, TEXT_TOKENS, WAN_PARTS

TINY_VOCAB = ("a person man woman is talking speaking speaks sings the an astronaut smiles "
              "and to camera in front of at looks").split()


def save_tiny_encoders(
    wan: str | Path,
    wav2vec: str | Path,
    image_dim: int = 1280,
    text_dim: int = 4096,
    audio_dim: int = 768,
    image_size: int = 224,
    patch_size: int = 14,
    seed: int = 0,
) -> None:
    """Write random tiny encoders in the real folder layouts, for tests and the CPU demo.

    ``wan`` gets ``vae/``, ``image_encoder/``, ``text_encoder/``, ``tokenizer/`` (a WordLevel
    tokenizer over a few words, built offline); ``wav2vec`` a ``Wav2Vec2Model`` with the real
    convolution stack (so token counts are real) and a feature extractor config. Widths default to
    the real ones, so their outputs fit the tiny DiT of ``conf/model/tiny.yaml``; everything else
    is one layer deep. They load back through :func:`load_encoders` like real weights.
    """
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel,
        Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model,
    )

    wan, wav2vec = Path(wan), Path(wav2vec)
    torch.manual_seed(seed)
    # The smallest VAE diffusers' own tests use: same strides (4, 8, 8) and z_dim 16 as the real one.
    AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     temperal_downsample=[False, True, True]).save_pretrained(wan / WAN_PARTS["vae"])
    clip = CLIPVisionConfig(hidden_size=image_dim, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=image_size, patch_size=patch_size, projection_dim=32)
    CLIPVisionModel(clip).save_pretrained(wan / WAN_PARTS["image"])

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(TINY_VOCAB))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=TEXT_TOKENS).save_pretrained(wan / WAN_PARTS["tokenizer"])
    t5 = UMT5Config(vocab_size=len(vocab), d_model=text_dim, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                    relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    UMT5EncoderModel(t5).save_pretrained(wan / WAN_PARTS["text"])

    w2v = Wav2Vec2Config(hidden_size=audio_dim, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                         vocab_size=32)
    Wav2Vec2Model(w2v).save_pretrained(wav2vec)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=AUDIO_RATE, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(wav2vec)


def write_tiny_base(wan: Path, wav2vec: Path) -> None:
    """A tiny random Wan2.1-I2V folder (the DiT of ``conf/model/tiny.yaml`` + tiny encoders) and a
    tiny wav2vec2 folder, in the real layouts, so every later step loads them like real weights."""
    from diffusers import WanTransformer3DModel
    from omegaconf import OmegaConf

    save_tiny_encoders(wan, wav2vec)
    tiny = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "tiny.yaml").transformer)
    torch.manual_seed(0)
    WanTransformer3DModel(**tiny).save_pretrained(wan / "transformer")


def write_random_state(path: Path, kind: str) -> None:
    """Randomly initialised metric networks saved as the weight files the real ones come in."""
    torch.manual_seed(0)
    if kind == "fid":
        from .metrics.fid import FIDInceptionV3

        net = FIDInceptionV3()
    else:
        from .metrics.syncnet import SyncNet

        net = SyncNet()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
