"""Local embedders: tiny random models saved to disk and loaded through the production providers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from imageloop import runtime  # noqa: E402
from imageloop.backends import make_embedder  # noqa: E402
from imageloop.config import Settings, load_settings  # noqa: E402
from imageloop.errors import ConfigError  # noqa: E402
from imageloop.tiny import NOISE_NOTICE  # noqa: E402
from imageloop.tiny.clip import build_tiny_clip  # noqa: E402
from imageloop.tools.embedders.local import OpenClipEmbedder, TransformersEmbedder, open_clip_embedder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LONG_CAPTION = " ".join(["a very detailed photograph of a small red bird"] * 30)  # ~300 tokens


def noise_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def assert_unit_rows(vectors: np.ndarray, n: int, dim: int) -> None:
    assert vectors.dtype == np.float32
    assert vectors.shape == (n, dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def run_python(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `script` in a fresh interpreter at the repository root."""
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="session")
def open_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny open_clip checkpoint folder (config + safetensors), as a downloaded one would be."""
    directory = tmp_path_factory.mktemp("open-clip-tiny")
    build_tiny_clip(directory)
    return directory


@pytest.fixture(scope="session")
def clip_vocab() -> dict[str, int]:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return vocab


def tiny_towers() -> dict[str, dict[str, int]]:
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    return {
        "text_config": {**layers, "max_position_embeddings": 16},
        "vision_config": {**layers, "image_size": 32, "patch_size": 8},
    }


@pytest.fixture(scope="session")
def transformers_clip_dir(tmp_path_factory: pytest.TempPathFactory, clip_vocab: dict[str, int]) -> Path:
    """A tiny transformers CLIPModel with its processor, saved with save_pretrained."""
    directory = tmp_path_factory.mktemp("hf-clip-tiny")
    towers = tiny_towers()
    towers["text_config"].update(vocab_size=len(clip_vocab), bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    transformers.CLIPModel(transformers.CLIPConfig(**towers, projection_dim=16)).save_pretrained(directory)
    transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=transformers.CLIPTokenizer(vocab=clip_vocab, merges=[]),
    ).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def transformers_siglip_dir(tmp_path_factory: pytest.TempPathFactory, clip_vocab: dict[str, int]) -> Path:
    """A tiny SiglipModel (with a small BPE tokenizer standing in for SigLIP's sentencepiece one)."""
    directory = tmp_path_factory.mktemp("hf-siglip-tiny")
    towers = tiny_towers()
    towers["text_config"].update(vocab_size=len(clip_vocab), pad_token_id=1)
    torch.manual_seed(0)
    transformers.SiglipModel(transformers.SiglipConfig(**towers)).save_pretrained(directory)
    transformers.SiglipProcessor(
        image_processor=transformers.SiglipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=transformers.CLIPTokenizer(vocab=clip_vocab, merges=[]),
    ).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def transformers_blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BLIP image-text retrieval checkpoint (its ITC projections are the joint space)."""
    directory = tmp_path_factory.mktemp("hf-blip-tiny")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "bird", "very", "detailed", "photograph"]
    vocab = {word: i for i, word in enumerate(words)}
    towers = tiny_towers()
    towers["text_config"].update(vocab_size=len(vocab), encoder_hidden_size=32, pad_token_id=0)
    torch.manual_seed(0)
    config = transformers.BlipConfig(**towers, image_text_hidden_size=16, architectures=["BlipForImageTextRetrieval"])
    transformers.BlipForImageTextRetrieval(config).save_pretrained(directory)
    transformers.BlipProcessor(
        image_processor=transformers.BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=transformers.BertTokenizer(vocab=vocab),
    ).save_pretrained(directory)
    return directory


@pytest.fixture
def tiny_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty tiny-model cache, so `tiny:clip` is built from its seed in this test."""
    monkeypatch.setenv("IMAGELOOP_TINY_CACHE", str(tmp_path / "tiny"))
    return tmp_path / "tiny"


@pytest.fixture(autouse=True)
def fresh_model_cache() -> Iterator[None]:
    runtime.clear_cache()
    yield
    runtime.clear_cache()


def cpu(embedder: str, **fields: str) -> Settings:
    return Settings(embedder=embedder, device="cpu", **fields)


# --- open_clip -------------------------------------------------------------------------------


def test_open_clip_directory_loads_through_the_provider(open_clip_dir: Path) -> None:
    embedder = make_embedder(cpu(f"open_clip:{open_clip_dir}"))
    assert isinstance(embedder, OpenClipEmbedder)
    assert embedder.model_id == f"open_clip:{open_clip_dir}"
    assert embedder.embeds_images
    assert embedder.dim == 32
    assert_unit_rows(embedder.embed_texts(["a red bird", "a blue car"]), 2, 32)
    assert_unit_rows(embedder.embed_images(noise_images(3)), 3, 32)


def test_open_clip_vectors_match_the_model_own_normalised_features(open_clip_dir: Path) -> None:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{open_clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{open_clip_dir}")
    images = noise_images(2)
    with torch.no_grad():
        expected_images = model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
        expected_texts = model.encode_text(tokenizer(["a red bird"]), normalize=True)
    embedder = open_clip_embedder(str(open_clip_dir), device="cpu")
    np.testing.assert_allclose(embedder.embed_images(images), expected_images.numpy(), atol=1e-5)
    np.testing.assert_allclose(embedder.embed_texts(["a red bird"]), expected_texts.numpy(), atol=1e-5)


def test_open_clip_truncates_captions_longer_than_its_context(open_clip_dir: Path) -> None:
    embedder = open_clip_embedder(str(open_clip_dir), device="cpu")
    # Only the first 77 tokens count: two captions that differ after them embed identically.
    vectors = embedder.embed_texts([LONG_CAPTION, LONG_CAPTION + " and then a blue car"])
    assert_unit_rows(vectors, 2, 32)
    np.testing.assert_array_equal(vectors[0], vectors[1])


def test_open_clip_batches_give_the_vectors_of_one_by_one(open_clip_dir: Path) -> None:
    name = f"local-dir:{open_clip_dir}"
    batched = OpenClipEmbedder(name, None, model_id="t", device="cpu", batch_size=2)
    single = OpenClipEmbedder(name, None, model_id="t", device="cpu", batch_size=1)
    images = noise_images(5)
    texts = ["a red bird", "a blue car", LONG_CAPTION, "x"]
    np.testing.assert_allclose(batched.embed_images(images), single.embed_images(images), atol=1e-5)
    np.testing.assert_allclose(batched.embed_texts(texts), single.embed_texts(texts), atol=1e-5)


def test_open_clip_model_loads_once_per_process(open_clip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import open_clip

    loads = []
    create = open_clip.create_model_and_transforms

    def counting_create(*args: object, **kwargs: object) -> object:
        loads.append(args)
        return create(*args, **kwargs)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", counting_create)
    first = open_clip_embedder(str(open_clip_dir), device="cpu")
    second = open_clip_embedder(str(open_clip_dir), device="cpu")
    third = OpenClipEmbedder(f"local-dir:{open_clip_dir}", None, model_id="other", device="cpu", batch_size=4)
    assert len(loads) == 1
    assert first._loaded is second._loaded is third._loaded


def test_open_clip_runs_in_the_requested_dtype(open_clip_dir: Path) -> None:
    embedder = make_embedder(cpu(f"open_clip:{open_clip_dir}", dtype="bfloat16"))
    assert isinstance(embedder, OpenClipEmbedder)
    assert embedder.dtype == torch.bfloat16
    assert_unit_rows(embedder.embed_images(noise_images(2)), 2, 32)


def test_open_clip_names_unknown_models_and_tags_at_once() -> None:
    with pytest.raises(ConfigError, match="unknown open_clip model 'ViT-Nope'"):
        open_clip_embedder("ViT-Nope/laion2b_s34b_b79k", device="cpu")
    with pytest.raises(ConfigError, match="laion2b_s34b_b79k"):
        open_clip_embedder("ViT-B-32/no-such-tag", device="cpu")
    with pytest.raises(ConfigError, match="name the weights as ViT-B-32/PRETRAINED"):
        open_clip_embedder("ViT-B-32", device="cpu")


# --- tiny:clip -------------------------------------------------------------------------------


def test_tiny_clip_is_rebuilt_identically_from_its_seed(tmp_path: Path) -> None:
    build_tiny_clip(tmp_path / "one")
    build_tiny_clip(tmp_path / "two")
    for name in ("open_clip_model.safetensors", "open_clip_config.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_tiny_clip_in_another_process_gives_identical_vectors(tiny_cache: Path, tmp_path: Path) -> None:
    embedder = make_embedder(cpu("tiny:clip"))
    assert embedder.model_id == "tiny:clip"
    noise_images(2)[0].save(tmp_path / "picture.png")
    here_texts = embedder.embed_texts(["a red bird", LONG_CAPTION])
    here_images = embedder.embed_images([Image.open(tmp_path / "picture.png").convert("RGB")])
    script = (
        "import json, sys; from PIL import Image; "
        "from imageloop.backends import make_embedder; from imageloop.config import load_settings; "
        "e = make_embedder(load_settings('tiny', {'device': 'cpu'})); "
        f"t = e.embed_texts(['a red bird', {LONG_CAPTION!r}]); "
        f"i = e.embed_images([Image.open({str(tmp_path / 'picture.png')!r}).convert('RGB')]); "
        "print(json.dumps({'id': e.model_id, 'texts': t.tolist(), 'images': i.tolist()}))"
    )
    # Another empty cache: the other process builds the model from the seed itself.
    result = run_python(script, {"IMAGELOOP_TINY_CACHE": str(tmp_path / "other-cache")})
    assert result.returncode == 0, result.stderr
    there = json.loads(result.stdout)
    assert there["id"] == "tiny:clip"
    np.testing.assert_array_equal(np.asarray(there["texts"], dtype=np.float32), here_texts)
    np.testing.assert_array_equal(np.asarray(there["images"], dtype=np.float32), here_images)
    assert NOISE_NOTICE in result.stderr


def test_tiny_profile_names_the_tiny_backends() -> None:
    settings = load_settings("tiny", environ={})
    assert (settings.vlm, settings.generator, settings.embedder) == ("tiny:qwen2-vl", "tiny:omnigen", "tiny:clip")


def test_tiny_embedder_knows_only_clip(tiny_cache: Path) -> None:
    with pytest.raises(ConfigError, match="tiny:clip"):
        make_embedder(cpu("tiny:siglip"))


# --- transformers ----------------------------------------------------------------------------


def test_transformers_clip_loads_through_the_provider(transformers_clip_dir: Path) -> None:
    embedder = make_embedder(cpu(f"transformers:{transformers_clip_dir}"))
    assert isinstance(embedder, TransformersEmbedder)
    assert embedder.model_id == f"transformers:{transformers_clip_dir}"
    assert embedder.dim == 16
    assert_unit_rows(embedder.embed_texts(["a red bird", LONG_CAPTION]), 2, 16)
    assert_unit_rows(embedder.embed_images(noise_images(3)), 3, 16)


def test_transformers_clip_cosines_are_the_model_logits(transformers_clip_dir: Path) -> None:
    embedder = TransformersEmbedder(str(transformers_clip_dir), device="cpu")
    model = transformers.CLIPModel.from_pretrained(transformers_clip_dir).eval()
    processor = transformers.CLIPProcessor.from_pretrained(transformers_clip_dir)
    images, texts = noise_images(2), ["a red bird", "blue"]
    with torch.no_grad():
        out = model(**processor(images=images, text=texts, padding=True, return_tensors="pt"))
    cosines = embedder.embed_images(images) @ embedder.embed_texts(texts).T
    np.testing.assert_allclose(cosines * model.logit_scale.exp().item(), out.logits_per_image.numpy(), atol=1e-4)


def test_transformers_clip_truncates_and_batches(transformers_clip_dir: Path) -> None:
    batched = TransformersEmbedder(str(transformers_clip_dir), device="cpu", batch_size=2)
    single = TransformersEmbedder(str(transformers_clip_dir), device="cpu", batch_size=1)
    texts = [LONG_CAPTION, LONG_CAPTION + " and a car", "a red bird"]
    vectors = batched.embed_texts(texts)
    np.testing.assert_array_equal(vectors[0], vectors[1])  # cut at 16 positions
    np.testing.assert_allclose(vectors, single.embed_texts(texts), atol=1e-5)
    images = noise_images(5)
    np.testing.assert_allclose(batched.embed_images(images), single.embed_images(images), atol=1e-5)


def test_transformers_reload_gives_identical_vectors(transformers_clip_dir: Path) -> None:
    images = noise_images(2)
    first = TransformersEmbedder(str(transformers_clip_dir), device="cpu").embed_images(images)
    runtime.clear_cache()
    second = TransformersEmbedder(str(transformers_clip_dir), device="cpu").embed_images(images)
    np.testing.assert_array_equal(first, second)


def test_transformers_siglip_cosines_are_the_model_logits(transformers_siglip_dir: Path) -> None:
    embedder = TransformersEmbedder(str(transformers_siglip_dir), device="cpu")
    model = transformers.SiglipModel.from_pretrained(transformers_siglip_dir).eval()
    processor = transformers.SiglipProcessor.from_pretrained(transformers_siglip_dir)
    images, texts = noise_images(2), ["a red bird", LONG_CAPTION]
    inputs = processor(images=images, text=texts, padding="max_length", truncation=True, max_length=16)
    with torch.no_grad():
        out = model(**inputs.convert_to_tensors("pt"))
    cosines = embedder.embed_images(images) @ embedder.embed_texts(texts).T
    logits = cosines * model.logit_scale.exp().item() + model.logit_bias.item()
    np.testing.assert_allclose(logits, out.logits_per_image.numpy(), atol=1e-4)


def test_transformers_blip_retrieval_uses_its_itc_space(transformers_blip_dir: Path) -> None:
    embedder = make_embedder(cpu(f"transformers:{transformers_blip_dir}"))
    assert embedder.dim == 16
    model = transformers.BlipForImageTextRetrieval.from_pretrained(transformers_blip_dir).eval()
    processor = transformers.BlipProcessor.from_pretrained(transformers_blip_dir)
    image, text = noise_images(1)[0], "a red bird"
    with torch.no_grad():
        out = model(**processor(images=image, text=[text], return_tensors="pt"), use_itm_head=False)
    cosine = embedder.embed_images([image]) @ embedder.embed_texts([text]).T
    np.testing.assert_allclose(cosine, out.itm_score.numpy(), atol=1e-5)


def test_transformers_refuses_a_model_without_an_image_text_space(tmp_path: Path) -> None:
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="'bert' model"):
        TransformersEmbedder(str(tmp_path), device="cpu")


# --- offline failures ------------------------------------------------------------------------


def test_models_missing_offline_fail_fast_with_how_to_get_them(tmp_path: Path) -> None:
    # The libraries are imported before the clock starts: the bound is on the failing lookup.
    script = (
        "import json, time\n"
        "import open_clip, transformers\n"
        "from imageloop.backends import make_embedder\n"
        "from imageloop.config import Settings\n"
        "from imageloop.errors import ConfigError\n"
        "out = []\n"
        "for spec in ['transformers:imageloop-test/no-such-model', 'open_clip:ViT-B-32/laion2b_s34b_b79k']:\n"
        "    start = time.monotonic()\n"
        "    try:\n"
        "        make_embedder(Settings(embedder=spec, device='cpu'))\n"
        "        out.append({'spec': spec, 'error': None})\n"
        "    except ConfigError as e:\n"
        "        out.append({'spec': spec, 'error': str(e), 'seconds': time.monotonic() - start})\n"
        "print(json.dumps(out))\n"
    )
    result = run_python(script, {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0, result.stderr
    transformers_failure, open_clip_failure = json.loads(result.stdout.splitlines()[-1])
    for failure in (transformers_failure, open_clip_failure):
        assert failure["error"] is not None, failure
        assert "HF_HUB_OFFLINE is set" in failure["error"]
        assert failure["seconds"] < 5
    assert "hf download imageloop-test/no-such-model" in transformers_failure["error"]
    assert "hf download laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in open_clip_failure["error"]
