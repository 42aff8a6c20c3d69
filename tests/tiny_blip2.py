"""A tiny random BLIP-2 image-text checkpoint (`Blip2ForImageTextRetrieval`), saved as a hub folder is.

One ViT layer on 32x32 pictures, a two-layer Q-Former that reads text (every layer cross-attends), four
query tokens, 16-wide projections, a BERT tokenizer over a small in-memory vocabulary and BLIP's image
processor: loaded by the real loading code (`from_pretrained`), as `Salesforce/blip2-itm-vit-g` would be.
"""

from __future__ import annotations

from pathlib import Path

WORDS = ("make", "it", "red", "blue", "green", "yellow", "magenta", "cyan", "the", "a", "an", "dot", "bars", "stripes",
         "checks", "frame", "with", "and", "on", "grey")  # fmt: skip


def build_tiny_blip2(directory: Path) -> Path:
    """Write the tiny checkpoint, its tokenizer and its image processor into `directory`."""
    import torch
    from transformers import BertTokenizerFast, Blip2Config, Blip2ForImageTextRetrieval, BlipImageProcessor

    directory.mkdir(parents=True, exist_ok=True)
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (directory / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    config = Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        qformer_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "vocab_size": len(vocabulary), "max_position_embeddings": 64, "cross_attention_frequency": 1,
                        "use_qformer_text_input": True},
        num_query_tokens=4,
        image_text_hidden_size=16,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        Blip2ForImageTextRetrieval(config).save_pretrained(directory)
    BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True).save_pretrained(directory)
    BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory
