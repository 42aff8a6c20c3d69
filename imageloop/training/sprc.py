"""SPRC on transformers' BLIP-2: sentence-level prompts composed by the Q-Former, trained as DAIG trains it.

Bai et al., "Sentence-level Prompts Benefit Composed Image Retrieval" (ICLR 2024; chunmeifeng/SPRC,
src/lavis/models/blip2_models/blip2_qformer_cir_align_prompt.py, trained by src/blip_fine_tune_2.py), built
on `Blip2ForImageTextRetrieval` (BLIP-2's first stage: a frozen ViT, the Q-Former with its text embeddings,
32 query tokens, the vision and text projections; `Salesforce/blip2-itm-vit-g` is SPRC's `pretrain` backbone):

    fusion    the query tokens and the change's tokens through the Q-Former, the queries cross-attending to
              the reference's ViT features; then the fused queries (as a sentence-level prompt) and the
              change through the Q-Former as text alone; the text [CLS]'s projection is the query feature
    target    the query tokens cross-attending to the target's ViT features, each projected and normalised
    loss_itc  max over the target's query features of the cosine with the query feature, over SPRC's
              learnable temperature (0.07 at start), cross-entropy over the batch's targets
    loss_rtc  the same with learnable prompt tokens (not the fused ones) and the change, text alone
    loss_align  mean squared error between the fused queries' mean and the prompt tokens' mean (detached)
    loss      loss_itc + 0.4 loss_rtc + 0.4 loss_align (`--loss-rtc`, `--loss-align` defaults)

The ViT stays frozen (its `freeze_vit`); the Q-Former, its text embeddings, the query and prompt tokens,
the projections and the temperature learn with AdamW (betas 0.9/0.98, eps 1e-7, weight decay 0.05). In
transformers, a Q-Former pass at `query_length=0` sends every token through the text feed-forward and skips
cross-attention, which is what SPRC's patched LAVIS Q-Former does when no image is given. DAIG's devices:
DRSP perturbs the reference's ViT features (per channel over its patch tokens, as DSU does on feature
maps) while pre-training; FRA's margin widens loss_itc's matching cosines while fine-tuning.

Where we differ: SPRC scores a gallery image by the maximum over its 32 query features; an index holds one
vector per image, so the `cir:FOLDER` embedder stores the normalised mean of those features and a query is
scored by one dot product with it (ours). SPRC's preprocessing is its `targetpad` transform, ours the
checkpoint's image processor; SPRC's learning rate follows a one-cycle schedule, ours is constant; SPRC
trains in mixed precision, we in float32. Its caption preprocessing (lower case, punctuation dropped, 50
words at most, `BlipCaptionProcessor`) and 32-token texts are kept.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from imageloop.errors import ConfigError
from imageloop.files import write_json_atomic
from imageloop.protocols import Vector
from imageloop.runtime import explain_load_failure, pick_device
from imageloop.tools.images import open_image
from imageloop.training.combiner import MODEL_CONFIG, own_embedder_id
from imageloop.training.drsp import DRSP
from imageloop.training.fra import FRALoss
from imageloop.training.options import CIRTrainingOptions
from imageloop.training.triplets import Triplet

if TYPE_CHECKING:
    from imageloop.training.cir import Stage

SPRC_FORMAT = "imageloop-cir-sprc/1"
BLIP2_DIR = "blip2"
PROMPTS_FILE = "sprc.safetensors"
MAX_TEXT_TOKENS = 32
MAX_WORDS = 50
LOSS_RTC, LOSS_ALIGN = 0.4, 0.4
INITIAL_TEMPERATURE = 0.07


def caption_text(change: str) -> str:
    """SPRC's text preprocessing (LAVIS `BlipCaptionProcessor`): lower case, punctuation out, 50 words at most."""
    text = re.sub(r"([.!\"()*#:;~])", " ", change.lower())
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:MAX_WORDS])


class SPRCNet(nn.Module):
    """A BLIP-2 image-text checkpoint plus SPRC's prompt tokens and temperature; `trainable` excludes the ViT."""

    def __init__(self, blip: Any, tokenizer: Any, image_processor: Any) -> None:
        super().__init__()
        self.blip = blip
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        qformer = blip.config.qformer_config
        if not qformer.use_qformer_text_input:
            raise ConfigError(
                "SPRC needs a BLIP-2 image-text checkpoint whose Q-Former reads text (Blip2ForImageTextRetrieval)"
            )
        prompts = torch.zeros(1, blip.config.num_query_tokens, qformer.hidden_size)
        self.prompt_tokens = nn.Parameter(prompts.normal_(0.0, qformer.initializer_range))
        self.temp = nn.Parameter(INITIAL_TEMPERATURE * torch.ones([]))
        self.trainable = nn.ModuleDict(
            {
                "qformer": blip.qformer,
                "embeddings": blip.embeddings,
                "vision_projection": blip.vision_projection,
                "text_projection": blip.text_projection,
            }
        )
        self.trainable.register_parameter("query_tokens", blip.query_tokens)
        self.trainable.register_parameter("prompt_tokens", self.prompt_tokens)
        self.trainable.register_parameter("temp", self.temp)

    @property
    def queries(self) -> int:
        """How many query tokens the Q-Former uses (32 in BLIP-2)."""
        return int(self.blip.config.num_query_tokens)

    def pixels(self, images: Sequence[Image.Image], device: str) -> torch.Tensor:
        """The checkpoint's image preprocessing."""
        rgb = [image.convert("RGB") for image in images]
        pixels: torch.Tensor = self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
        return pixels.to(device)

    def tokens(self, texts: Sequence[str], device: str) -> tuple[torch.Tensor, torch.Tensor]:
        """SPRC's text: preprocessed, padded to 32 tokens."""
        encoded = self.tokenizer(
            [caption_text(t) for t in texts], padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS,
            return_tensors="pt",
        )  # fmt: skip
        return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)

    def vit(self, pixels: torch.Tensor) -> torch.Tensor:
        """The frozen ViT's layer-normed patch features (LAVIS's `ln_vision(visual_encoder(image))`)."""
        with torch.no_grad():
            embeds: torch.Tensor = self.blip.vision_model(pixel_values=pixels).last_hidden_state
        return embeds

    def _qformer(self, embeds: torch.Tensor, query_length: int, mask: torch.Tensor, image: torch.Tensor | None) -> Any:
        image_mask = None if image is None else torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        return self.blip.qformer(
            query_embeds=embeds, query_length=query_length, attention_mask=mask, encoder_hidden_states=image,
            encoder_attention_mask=image_mask,
        ).last_hidden_state  # fmt: skip

    def target_features(self, image: torch.Tensor) -> torch.Tensor:
        """Each image's query features, projected and normalised: (batch, queries, dim)."""
        batch = image.shape[0]
        queries = self.blip.query_tokens.expand(batch, -1, -1)
        mask = torch.ones(queries.shape[:-1], dtype=torch.long, device=image.device)
        states = self._qformer(queries, self.queries, mask, image)
        return F.normalize(self.blip.vision_projection(states), dim=-1)

    def fusion(self, image: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The composed query feature (batch, dim) and the fused query states that served as its prompt."""
        batch = image.shape[0]
        queries = self.blip.query_tokens.expand(batch, -1, -1)
        full_mask = torch.cat([torch.ones(queries.shape[:-1], dtype=mask.dtype, device=mask.device), mask], dim=1)
        fused = self._qformer(self.blip.embeddings(input_ids=ids, query_embeds=queries), self.queries, full_mask, image)
        prompt = fused[:, : self.queries]
        text = self._qformer(self.blip.embeddings(input_ids=ids, query_embeds=prompt), 0, full_mask, None)
        return F.normalize(self.blip.text_projection(text[:, self.queries]), dim=-1), prompt

    def prompted_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The change read with the learnable prompt tokens alone (SPRC's relative contrastive branch)."""
        prompts = self.prompt_tokens.expand(ids.shape[0], -1, -1)
        full_mask = torch.cat([torch.ones(prompts.shape[:-1], dtype=mask.dtype, device=mask.device), mask], dim=1)
        text = self._qformer(self.blip.embeddings(input_ids=ids, query_embeds=prompts), 0, full_mask, None)
        return F.normalize(self.blip.text_projection(text[:, 0]), dim=-1)

    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """BLIP-2's own text feature (its ITC [CLS] projection), for text queries on an SPRC index."""
        text = self._qformer(self.blip.embeddings(input_ids=ids), 0, mask, None)
        return F.normalize(self.blip.text_projection(text[:, 0]), dim=-1)


def load_sprc(source: str, device: str) -> SPRCNet:
    """A `Blip2ForImageTextRetrieval` checkpoint (hub id or folder), with its tokenizer and image processor."""
    from transformers import AutoImageProcessor, AutoTokenizer, Blip2ForImageTextRetrieval

    name = source.removeprefix("transformers:")
    try:
        blip = Blip2ForImageTextRetrieval.from_pretrained(name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(name)
        processor = AutoImageProcessor.from_pretrained(name)
    except Exception as e:
        raise explain_load_failure(name, e) from e
    return SPRCNet(blip, tokenizer, processor).to(device)


class SPRCPart:
    """SPRC's Q-Former side learning (the ViT frozen), one part through DAIG's two stages."""

    name = "qformer"

    def __init__(self, base: str, options: CIRTrainingOptions, device: str) -> None:
        if options.drsp_features != "visual":
            raise ConfigError("sprc perturbs visual features only: its text enters as tokens, not one feature")
        self.net = load_sprc(base, device)
        self.base = base
        self.options = options
        self.device = device

    @property
    def module(self) -> nn.Module:
        """What learns (everything but the ViT)."""
        return self.net.trainable

    def start(self) -> None:
        """Train mode (the Q-Former's dropout on), the ViT frozen and in eval mode."""
        self.net.train()
        self.net.blip.vision_model.eval().requires_grad_(False)

    def optimizer(self, stage: Stage) -> torch.optim.Optimizer:
        """SPRC's AdamW over what learns."""
        learning = [p for p in self.module.parameters() if p.requires_grad]
        return torch.optim.AdamW(
            learning, lr=self.options.encoder_rate(), betas=(0.9, 0.98), eps=1e-7, weight_decay=0.05
        )

    def loss(self, triplets: Sequence[Triplet], drsp: DRSP, criterion: FRALoss) -> torch.Tensor:
        """SPRC's three losses, FRA's margin on the composed query's matching cosines, DRSP on the reference."""
        net = self.net
        pictures = [open_image(t.reference_image) for t in triplets] + [open_image(t.target_image) for t in triplets]
        embeds = net.vit(net.pixels(pictures, self.device))
        references, targets = embeds[: len(triplets)], embeds[len(triplets) :]
        references = DRSP(drsp.p, dim=1).train()(references)
        ids, mask = net.tokens([t.change for t in triplets], self.device)
        composed, prompt = net.fusion(references, ids, mask)
        target_features = net.target_features(targets)
        labels = torch.arange(len(triplets), device=composed.device)
        itc = F.cross_entropy(criterion.widen(_max_similarity(composed, target_features)) / net.temp, labels)
        rtc = F.cross_entropy(_max_similarity(net.prompted_text(ids, mask), target_features) / net.temp, labels)
        align = F.mse_loss(prompt.mean(1), net.prompt_tokens.detach().expand_as(prompt).mean(1))
        return itc + LOSS_RTC * rtc + LOSS_ALIGN * align

    def save(self, out_dir: Path, training: dict[str, Any]) -> None:
        """The fine-tuned checkpoint (`blip2/`, with its tokenizer and processor), the prompts, then `config.json`."""
        from safetensors.torch import save_file

        folder = out_dir / BLIP2_DIR
        self.net.blip.save_pretrained(folder)
        self.net.tokenizer.save_pretrained(folder)
        self.net.image_processor.save_pretrained(folder)
        prompts = {"prompt_tokens": self.net.prompt_tokens.detach().cpu(), "temp": self.net.temp.detach().cpu()}
        save_file(prompts, str(out_dir / PROMPTS_FILE))
        config = {"format": SPRC_FORMAT, "blip2": BLIP2_DIR, "base": self.base, "training": training}
        write_json_atomic(out_dir / MODEL_CONFIG, config)


def _max_similarity(queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(batch, batch) cosines: each query against each target's best-matching query feature (SPRC's max)."""
    return torch.einsum("qd,tkd->qtk", queries, targets).max(dim=-1).values


def _load_folder(directory: Path, device: str) -> SPRCNet:
    from safetensors.torch import load_file

    net = load_sprc(str(directory / BLIP2_DIR), device)
    prompts = load_file(str(directory / PROMPTS_FILE))
    with torch.no_grad():
        net.prompt_tokens.copy_(prompts["prompt_tokens"])
        net.temp.copy_(prompts["temp"])
    return net.eval()


class SPRCModel:
    """A trained SPRC folder as a composed-query model: it reads the reference image and the change themselves."""

    def __init__(self, directory: Path, net: SPRCNet, device: str) -> None:
        self.embedder_id = own_embedder_id(directory)
        self.net = net
        self.device = device

    @classmethod
    def load(cls, directory: Path, device: str | None = None) -> SPRCModel:
        """Load the folder `train cir --model sprc` wrote."""
        placed = pick_device(device)
        return cls(directory, _load_folder(directory, placed), placed)

    def require_embedder(self, model_id: str) -> None:
        """Serve only an index built with this folder's own embedder (`cir:FOLDER`)."""
        if model_id != self.embedder_id:
            from imageloop.errors import EmbedderMismatchError

            raise EmbedderMismatchError(
                f"this SPRC model fine-tuned its own encoders: search an index built with `embedder` "
                f"{self.embedder_id}, not {model_id}"
            )

    def embed_query(self, reference_image_vector: Vector, text_vector: Vector) -> Vector:
        """Refused: SPRC composes from the reference's ViT features and the change's tokens, not from two vectors."""
        raise ConfigError("an SPRC model composes from the reference image and the change: use embed_composed")

    def embed_composed(self, reference: Path, change: str) -> Vector:
        """The unit query vector of (reference image, change)."""
        net = self.net
        with torch.inference_mode():
            ids, mask = net.tokens([change], self.device)
            composed, _ = net.fusion(net.vit(net.pixels([open_image(reference)], self.device)), ids, mask)
        vector: Vector = composed[0].float().cpu().numpy().astype(np.float32)
        return vector


class SPRCEmbedder:
    """`cir:FOLDER` for an SPRC folder: images as the normalised mean of their query features, texts as BLIP-2's."""

    embeds_images = True

    def __init__(self, directory: Path, device: str | None = None, dtype: str | None = None) -> None:
        from imageloop.runtime import load_cached

        self.device = pick_device(device)
        self.model_id = own_embedder_id(directory)
        self.net: SPRCNet = load_cached(
            ("sprc", str(directory.resolve()), self.device), lambda: _load_folder(directory, self.device)
        )

    @property
    def dim(self) -> int:
        """The projections' width (256 in BLIP-2)."""
        return int(self.net.blip.config.image_text_hidden_size)

    def embed_images(self, images: Sequence[Image.Image]) -> Vector:
        """Unit vectors: the mean of each image's normalised query features, normalised (ours; SPRC takes the max)."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            features = self.net.target_features(self.net.vit(self.net.pixels(images, self.device)))
            rows: Vector = F.normalize(features.mean(dim=1), dim=-1).float().cpu().numpy().astype(np.float32)
        return rows

    def embed_texts(self, texts: Sequence[str]) -> Vector:
        """Unit BLIP-2 text features."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            rows: Vector = self.net.text_features(*self.net.tokens(texts, self.device)).float().cpu().numpy()
        return rows.astype(np.float32)
