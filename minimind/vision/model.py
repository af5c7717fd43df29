"""The vision-language model: our decoder, a vision tower and a projector (LayerNorm -> Linear -> GELU -> Linear, as
MiniMind-V). Each image's patch features replace the embeddings of its run of <|image_pad|> tokens.

`vlm = VisionLanguageModel.from_llm(load_model("llm/"), "siglip-dir/" or None for the tiny tower)`;
`vlm(input_ids, pixel_values=[N, 3, S, S], image_counts=[B])`; `save_model(vlm, dir)`, `load_model(dir)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from minimind import MiniMindError
from minimind.config import ModelConfig
from minimind.model import CausalLMOutput, MiniMindForCausalLM
from minimind.vision.config import VisionConfig, tiny_encoder
from minimind.vision.encoders import build_tower, load_tower, patch_features

FREEZE_CHOICES = (0, 1, 2)


class Projector(nn.Module):
    """Tower features -> the decoder's hidden size. Parameter names are MiniMind-V's (`vision_proj.mlp.N`)."""

    def __init__(self, feature_size: int, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(feature_size), nn.Linear(feature_size, hidden_size), nn.GELU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class VisionLanguageModel(MiniMindForCausalLM):
    """A MiniMindForCausalLM (the decoder, unchanged: dense or MoE, KV cache, generation) with a vision tower
    and a projector beside it. Subclassing keeps the decoder's parameter names (`model.*`, `lm_head`), which
    are also MiniMind-V's, so checkpoints, LoRA and the sampler treat it as the language model it is."""

    def __init__(self, cfg: ModelConfig, vision: VisionConfig) -> None:
        super().__init__(cfg)
        self.vision = vision
        self.vision_encoder = build_tower(vision)
        self.vision_proj = Projector(vision.feature_size, cfg.hidden_size)

    @classmethod
    def from_llm(cls, llm: MiniMindForCausalLM, encoder: str | Path | dict | None = None,
                 seed: int = 0) -> VisionLanguageModel:
        """A new VLM around a trained language model. `encoder`: a transformers tower directory (pretrained),
        a tower config dict (fresh weights), or None for the tiny tower (tiny_encoder()). The projector (and a
        fresh tower) start from `seed`."""
        if isinstance(encoder, (str, Path)):
            vision, tower = load_tower(encoder)
        else:
            vision, tower = VisionConfig(encoder=encoder or tiny_encoder()), None
        with torch.device("meta"):  # the decoder's weights come from `llm`: skip initialising them twice
            model = cls(llm.config, vision)
        model.to_empty(device="cpu")
        model.model.rotary.reset()
        model.load_state_dict(llm.state_dict(), strict=False)  # (the vision keys are replaced below)
        if llm.config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        torch.manual_seed(seed)
        model.vision_encoder = build_tower(vision) if tower is None else tower
        model.vision_proj = Projector(vision.feature_size, llm.config.hidden_size)
        weight = llm.model.embed_tokens.weight
        return model.to(device=weight.device, dtype=weight.dtype).train(llm.training)

    @property
    def image_tokens(self) -> int:
        return self.vision.image_tokens


    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N, image_tokens, hidden]. A tower with nothing to train runs without autograd."""
        S = self.vision.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, S, S):
            raise MiniMindError(f"pixel_values must be [N, 3, {S}, {S}], not {list(pixel_values.shape)}")
        trains = any(p.requires_grad for p in self.vision_encoder.parameters())
        with torch.set_grad_enabled(trains and torch.is_grad_enabled()):
            feats = patch_features(self.vision_encoder, self.vision.kind,
                                   pixel_values.to(self.vision_proj.mlp[1].weight.dtype))
        return self.vision_proj(feats)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
              image_counts: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """Token embeddings [B, T, hidden] with the images' features at the <|image_pad|> positions: image k of
        the batch (row-major order of appearance) fills the k-th run of image_tokens pads."""
        x = self.model.embed_tokens(input_ids)
        pads = input_ids == self.vision.image_token_id
        n, per = pixel_values.shape[0], self.image_tokens
        per_row = pads.sum(-1).tolist()
        if image_counts is not None:
            counts = [int(c) for c in image_counts]
            if len(counts) != input_ids.shape[0] or sum(counts) != n:
                raise MiniMindError(f"image_counts {counts} must give one count per row ({input_ids.shape[0]}) "
                                    f"summing to the number of images ({n})")
            wrong = [b for b, (have, c) in enumerate(zip(per_row, counts)) if have != c * per]
            if wrong:
                b = wrong[0]
                raise MiniMindError(f"row {b} has {per_row[b]} image tokens for {counts[b]} image(s); each image "
                                    f"takes {per} consecutive {self.vision.image_token_id} (<|image_pad|>) ids")
        elif sum(per_row) != n * per:
            raise MiniMindError(f"the batch has {sum(per_row)} image tokens for {n} image(s) of {per} tokens each")
        if n == 0:
            return x
        feats = self.image_features(pixel_values).to(x.dtype)
        return x.masked_scatter(pads[..., None], feats.reshape(-1, feats.shape[-1]))

    def forward(self, input_ids: torch.Tensor, *args, pixel_values: torch.Tensor | None = None,
                image_counts: torch.Tensor | list[int] | None = None, **kwargs) -> CausalLMOutput:
        """MiniMindForCausalLM.forward with images (keyword-only, so positional calls mean what they mean for the
        language model): pixel_values [N, 3, S, S], normalised (VisionConfig), every image of the batch in order
        of appearance; image_counts [B] per row (zeros for text-only rows) is checked against the pads when given.
        Without pixel_values, pads are ordinary tokens (decoding steps)."""
        if pixel_values is not None:
            kwargs["inputs_embeds"] = self.embed(input_ids, pixel_values, image_counts)
        return super().forward(input_ids, *args, **kwargs)


def set_trainable(model: VisionLanguageModel, freeze_llm: int, train_encoder: bool = False) -> int:
    """MiniMind-V's --freeze_llm: 2 trains the projector only; 1 the projector and the decoder's first and last
    layers; 0 the projector and the whole decoder (embeddings, norm and head too). The tower trains only with
    train_encoder (the tiny one learns from scratch; a pretrained one stays frozen). Returns the trainable count."""
    if freeze_llm not in FREEZE_CHOICES:
        raise MiniMindError(f"freeze_llm must be one of {FREEZE_CHOICES}, not {freeze_llm!r}")
    last = model.config.num_hidden_layers - 1
    for name, p in model.named_parameters():
        if name.startswith("vision_proj."):
            p.requires_grad = True
        elif name.startswith("vision_encoder."):
            p.requires_grad = train_encoder
        elif freeze_llm == 0:
            p.requires_grad = True
        else:
            p.requires_grad = freeze_llm == 1 and name.startswith(("model.layers.0.", f"model.layers.{last}."))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
