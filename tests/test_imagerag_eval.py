"""`imageloop eval imagerag`: prompts in, every prompt's draft and final image scored, a resumable summary out.

The metrics run through their real loading code on tiny random models saved here (a transformers SigLIP,
a DINOv2 backbone, the tiny open_clip); the loop itself runs on the scripted `fake:` backends, and the
VLM judge also on a local OpenAI-compatible server.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from imageloop import runtime
from imageloop.app import App
from imageloop.backends import make_vlm
from imageloop.cli import main
from imageloop.config import Settings
from imageloop.errors import ConfigError, ImageloopError
from imageloop.eval.imagerag import PromptCase, load_prompts, mean_ci
from imageloop.eval.scorers import DinoScorer, TextImageScorer, VLMJudge, dino_encoder
from imageloop.prompts import JUDGE_PROMPT
from imageloop.protocols import GREEDY, Message
from imageloop.tools.embedders.local import TransformersEmbedder
from imageloop.tools.indexing.indexer import index_folder
from tests.fake_openai_server import FakeOpenAIServer, chat_completion
from tests.fake_providers import captioned_folder, fake_backends
from tests.fakes import FakeHashEmbedder, ScriptedGenerator, ScriptedVLM

NOT_ALIGNED = {"aligned": False, "missing_concepts": ["blue jay"]}
CAPTIONS = {"captions": [{"concept": "blue jay", "caption": "a blue jay with a blue crest"}]}
ALIGNED = {"aligned": True, "missing_concepts": []}


def picture(path: Path, colour: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[:, :] = colour
    pixels[:8, : colour[0] % 32] = 255  # not flat: a DINO backbone's layer norm would see no signal
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(autouse=True)
def fresh_model_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("IMAGELOOP_TINY_CACHE", str(tmp_path / "tiny"))
    runtime.clear_cache()
    yield
    runtime.clear_cache()


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DINOv2 backbone with its image processor, saved as a hub checkpoint would be."""
    directory = tmp_path_factory.mktemp("dinov2-tiny")
    torch.manual_seed(0)
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, mlp_ratio=2, image_size=32, patch_size=8
    )
    transformers.Dinov2Model(config).save_pretrained(directory)
    processor = transformers.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny transformers SigLIP (a character-level BPE tokenizer stands in for its sentencepiece one)."""
    directory = tmp_path_factory.mktemp("siglip-tiny")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab.update({char: len(vocab), char + "</w>": len(vocab) + 1})
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    torch.manual_seed(0)
    config = transformers.SiglipConfig(
        text_config={**tower, "max_position_embeddings": 16, "vocab_size": len(vocab), "pad_token_id": 1},
        vision_config={**tower, "image_size": 32, "patch_size": 8},
    )
    transformers.SiglipModel(config).save_pretrained(directory)
    transformers.SiglipProcessor(
        image_processor=transformers.SiglipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=transformers.CLIPTokenizer(vocab=vocab, merges=[]),
    ).save_pretrained(directory)
    return directory


# --- prompts -------------------------------------------------------------------------------------------


def test_a_prompt_file_names_classes_with_a_tab_and_skips_blank_and_comment_lines(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# rare birds\na jay on a branch\n\nblue_jay\ta Cyanocitta cristata in snow\na jay on a branch\n"
    )
    cases = load_prompts(prompts, real_images=tmp_path / "real")
    assert [(c.prompt, c.label, c.real_images) for c in cases] == [
        ("a jay on a branch", None, None),
        ("a Cyanocitta cristata in snow", "blue_jay", tmp_path / "real" / "blue_jay"),
    ]
    assert len({c.key for c in cases}) == 2 and load_prompts(prompts)[1].key == cases[1].key  # keys are stable


def test_a_class_folder_gives_a_photo_of_each_class_with_its_own_images_as_the_real_ones(tmp_path: Path) -> None:
    root = tmp_path / "val"
    picture(root / "n01530575" / "a.png", (10, 20, 30))
    picture(root / "golden_retriever" / "b.png", (30, 20, 10))
    (root / "LOC_synset_mapping.txt").write_text("n01530575 brambling, Fringilla montifringilla\n")
    cases = load_prompts(root)
    assert [(c.prompt, c.label, c.real_images) for c in cases] == [
        ("a photo of a golden retriever", "golden_retriever", root / "golden_retriever"),
        ("a photo of a brambling", "n01530575", root / "n01530575"),
    ]


def test_empty_or_malformed_prompt_files_are_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("# nothing\n")
    (tmp_path / "bad.txt").write_text("\ta prompt without its class\n")
    with pytest.raises(ImageloopError, match="no prompts in it"):
        load_prompts(tmp_path / "empty.txt")
    with pytest.raises(ImageloopError, match="line 1: expected PROMPT or CLASS<TAB>PROMPT"):
        load_prompts(tmp_path / "bad.txt")


def test_the_interval_is_a_seeded_bootstrap_around_the_mean() -> None:
    values = [0.1, 0.2, 0.3, 0.4, 0.9]
    summary = mean_ci(values)
    assert summary["mean"] == pytest.approx(0.38) and summary["n"] == 5
    assert summary["ci95"][0] < 0.38 < summary["ci95"][1] and mean_ci(values) == summary
    assert mean_ci([]) == {"mean": None, "ci95": [None, None], "n": 0}


# --- the metrics, through their real loading code on tiny models ---------------------------------------


def test_siglip_scores_the_cosine_behind_the_models_own_logits(siglip_dir: Path, tmp_path: Path) -> None:
    image = picture(tmp_path / "drawn.png", (200, 40, 90))
    scorer = TextImageScorer("siglip", TransformersEmbedder(str(siglip_dir), device="cpu"))
    score = scorer.score(PromptCase("k", "a red bird", None, None), image)

    model = transformers.SiglipModel.from_pretrained(siglip_dir).eval()
    processor = transformers.SiglipProcessor.from_pretrained(siglip_dir)
    inputs = processor(text=["a red bird"], images=Image.open(image), padding="max_length", truncation=True,
                       max_length=16, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        logit = model(**inputs).logits_per_image[0, 0].item()
    assert score == pytest.approx((logit - model.logit_bias.item()) / model.logit_scale.exp().item(), abs=1e-4)


def test_clip_scores_through_the_settings_embedders_and_refuses_a_text_only_one() -> None:
    with pytest.raises(ConfigError, match="does not embed images"):
        TextImageScorer("clip", FakeHashEmbedder(embeds_images=False))


def test_dino_averages_the_cosine_to_each_real_image_of_the_class(dino_dir: Path, tmp_path: Path) -> None:
    real = [picture(tmp_path / "real" / "jay" / f"{i}.png", (30 * i + 20, 90, 200 - 40 * i)) for i in range(3)]
    drawn = picture(tmp_path / "drawn.png", (60, 120, 40))
    scorer = DinoScorer(dino_encoder(f"transformers:{dino_dir}", Settings(device="cpu")))
    score = scorer.score(PromptCase("k", "a photo of a jay", "jay", tmp_path / "real" / "jay"), drawn)

    model = transformers.Dinov2Model.from_pretrained(dino_dir).eval()
    processor = transformers.BitImageProcessor.from_pretrained(dino_dir)
    with torch.no_grad():
        features = model(**processor(images=[Image.open(p).convert("RGB") for p in [drawn, *real]],
                                     return_tensors="pt")).pooler_output  # fmt: skip
    unit = torch.nn.functional.normalize(features, dim=-1)
    assert score == pytest.approx(float((unit[1:] @ unit[0]).mean()), abs=1e-5)
    assert scorer.score(PromptCase("k", "a photo of a jay", "jay", tmp_path / "real" / "jay"), real[0]) < 1.0001
    assert scorer.score(PromptCase("k", "a jay", None, None), drawn) is None  # no class, no real images


def test_dino_takes_a_transformers_backbone_only() -> None:
    with pytest.raises(ConfigError, match="expected transformers:MODEL"):
        dino_encoder("open_clip:ViT-B-32/openai", Settings())


@pytest.mark.parametrize(
    ("answer", "score"), [("85", 0.85), ("Score: 72.5/100", 0.725), ("150", 1.0), ("I cannot tell", None)]
)
def test_the_judge_reads_a_0_to_100_rating_as_a_fraction(answer: str, score: float | None, tmp_path: Path) -> None:
    vlm = ScriptedVLM([answer])
    image = picture(tmp_path / "drawn.png", (1, 2, 3))
    assert VLMJudge(vlm).score(PromptCase("k", "a blue jay", None, None), image) == score
    ((messages, schema),) = vlm.calls
    assert messages == [Message("user", JUDGE_PROMPT.format(prompt="a blue jay"), (image,))] and schema is None
    assert vlm.decodings == [GREEDY]


def test_the_judge_runs_on_any_openai_compatible_vlm(openai_server: FakeOpenAIServer, tmp_path: Path) -> None:
    openai_server.push("/v1/chat/completions", 200, chat_completion("64"))
    settings = Settings(vlm="openai:judge-model", vlm_base_url=openai_server.base_url, vlm_api_key="sk-test")
    image = picture(tmp_path / "drawn.png", (1, 2, 3))
    assert VLMJudge(make_vlm(settings)).score(PromptCase("k", "a blue jay", None, None), image) == 0.64
    (sent,) = openai_server.requests_to("/v1/chat/completions")
    assert sent.json["model"] == "judge-model" and sent.json["temperature"] == 0
    content = sent.json["messages"][-1]["content"]
    assert any(part.get("type") == "image_url" for part in content)


# --- the evaluation end to end -------------------------------------------------------------------------


def scripted_loop(judge: str = "80") -> list[Any]:
    """VLM answers for any number of prompts: each critique says 'not aligned' for a draft, then 'aligned'."""
    critiques = iter([NOT_ALIGNED, ALIGNED] * 50)

    def answer(messages: Sequence[Message]) -> Any:
        text = messages[-1].text
        if text.startswith("How well does this image match"):
            return judge
        if "Concepts:" in text:
            return CAPTIONS
        return next(critiques)

    return [answer] * 200


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = captioned_folder(tmp_path / "photos")
    index_folder(folder, FakeHashEmbedder(), None, progress=False)
    return folder


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a blue jay on a branch\nbirds\ta cat under a blue jay\n")
    picture(tmp_path / "real" / "birds" / "one.png", (20, 60, 220))
    return path


def evaluate(app: App, prompts: Path, photos: Path, out: Path, **options: Any) -> dict[str, Any]:
    return app.eval_imagerag(prompts, photos, out, knobs={"max_iterations": 1}, **options)


def test_each_prompt_is_run_once_and_its_draft_and_final_scored(
    photos: Path, prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dino_dir: Path
) -> None:
    out = tmp_path / "eval"
    with fake_backends(monkeypatch, scripted_loop()) as fakes:
        app = App(fakes.settings.with_overrides({"eval_clip": "tiny:clip", "eval_dino": f"transformers:{dino_dir}"}))
        metrics = "clip,dino,vlmscore"
        summary = evaluate(app, prompts, photos, out, real_images=tmp_path / "real", metrics=metrics)
        drawn = len(fakes.generator.requests)
        again = evaluate(app, prompts, photos, out, real_images=tmp_path / "real", metrics=metrics)
        assert len(fakes.generator.requests) == drawn  # the rerun found every prompt done
        app.close()
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [line["prompt"] for line in lines] == ["a blue jay on a branch", "a cat under a blue jay"]
    assert drawn == 4 and all(line["stop_reason"] == "aligned" and line["iterations"] == 1 for line in lines)
    first, second = (line["scores"] for line in lines)
    assert set(first) == {"clip", "dino", "vlmscore"} and first["vlmscore"] == {"draft": 0.8, "final": 0.8}
    assert first["dino"] == {"draft": None, "final": None} and second["dino"]["final"] is not None
    assert summary["n"] == 2 and summary["metrics"]["clip"]["draft"]["n"] == 2
    assert set(summary["metrics"]["clip"]) == {"draft", "final", "delta"}
    assert again["metrics"] == summary["metrics"] == json.loads((out / "summary.json").read_text())["metrics"]
    page = (out / "report.html").read_text()
    assert "<svg" in page and "Best (by clip gain)" in page and 'src="runs/' in page


def test_a_prompt_whose_run_failed_is_recorded_and_retried_next_time(
    photos: Path, prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = ScriptedGenerator.generate
    calls = iter(range(100))

    def failing_first(self: ScriptedGenerator, request: Any) -> Any:
        if next(calls) == 0:
            raise ImageloopError("the generator is out of memory")
        return original(self, request)

    monkeypatch.setattr(ScriptedGenerator, "generate", failing_first)
    out = tmp_path / "eval"
    with fake_backends(monkeypatch, scripted_loop()) as fakes:
        app = App(fakes.settings.with_overrides({"eval_clip": "tiny:clip"}))
        first = evaluate(app, prompts, photos, out, metrics="clip")
        second = evaluate(app, prompts, photos, out, metrics="clip")
        app.close()
    assert (first["n"], second["n"]) == (1, 2)
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [line["error"] for line in lines] == ["the generator is out of memory", None, None]


def test_a_prompt_killed_mid_run_is_resumed_next_time_never_scored_half_done(
    photos: Path, prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "eval"
    original = ScriptedGenerator.generate
    calls = iter(range(100))
    on_disk: dict[Path, bytes] = {}

    def killed_at_the_second_drawing(self: ScriptedGenerator, request: Any) -> Any:
        if next(calls) == 1:
            # What a kill -9 here leaves: the record written after the last step, the run `running`.
            on_disk.update((path, path.read_bytes()) for path in (out / "runs").glob("*/run.json"))
            raise KeyboardInterrupt
        return original(self, request)

    monkeypatch.setattr(ScriptedGenerator, "generate", killed_at_the_second_drawing)
    with fake_backends(monkeypatch, scripted_loop()) as fakes:
        app = App(fakes.settings.with_overrides({"eval_clip": "tiny:clip"}))
        with pytest.raises(KeyboardInterrupt):
            evaluate(app, prompts, photos, out, metrics="clip")
        for path, data in on_disk.items():
            path.write_bytes(data)
        (killed,) = [json.loads(data) for data in on_disk.values()]
        summary = evaluate(app, prompts, photos, out, metrics="clip")
        app.close()
    assert (killed["status"], killed["stop_reason"]) == ("running", None)
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    resumed = next(line for line in lines if line["prompt"] == "a blue jay on a branch")
    assert summary["n"] == 2 and resumed["stop_reason"] is not None and resumed["iterations"] == 1


def test_dino_without_real_images_and_unknown_metrics_are_refused(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a blue jay\n")
    with fake_backends(monkeypatch) as fakes:
        app = App(fakes.settings)
        with pytest.raises(ConfigError, match="dino compares with real images"):
            evaluate(app, prompts, photos, tmp_path / "eval", metrics="clip,dino")
        with pytest.raises(ConfigError, match="expected some of clip,siglip,dino,vlmscore"):
            evaluate(app, prompts, photos, tmp_path / "eval", metrics="fid")


def test_an_output_folder_with_other_settings_is_not_reused(
    photos: Path, prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "eval"
    with fake_backends(monkeypatch, scripted_loop()) as fakes:
        app = App(fakes.settings)
        evaluate(app, prompts, photos, out, metrics="vlmscore")
        with pytest.raises(ImageloopError, match="holds an evaluation with other settings"):
            app.eval_imagerag(prompts, photos, out, metrics="vlmscore", knobs={"critic": "paper"})


def test_the_command_line_prints_draft_and_final_means_last(
    photos: Path, prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["eval", "imagerag", "--prompts", str(prompts), "--index", str(photos), "--out", str(tmp_path / "eval"),
            "--metrics", "clip,vlmscore", "--eval-clip", "tiny:clip", "--vlm", "fake:vlm", "--generator",
            "fake:generator", "--embedder", "fake:hash", "--json"]  # fmt: skip
    with fake_backends(monkeypatch, scripted_loop(judge="40")):
        assert main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["n"] == 2 and set(printed["metrics"]) == {"clip", "vlmscore"}
    assert printed["metrics"]["vlmscore"] == {"draft": 0.4, "final": 0.4}
    assert isinstance(printed["metrics"]["clip"]["final"], float)


def test_the_paper_preset_on_openai_models_evaluates_on_a_local_openai_compatible_server(
    openai_server: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    folder = captioned_folder(tmp_path / "photos")
    assert main(["index", str(folder), "--profile", "openai"]) == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue jay on a snowy branch\n")
    for answer in ("yes", "70"):  # the paper critic's decision, then the judge (the draft is returned: once)
        openai_server.push("/v1/chat/completions", 200, chat_completion(answer))
    args = ["eval", "imagerag", "--prompts", str(prompts), "--index", str(folder), "--out", str(tmp_path / "eval"),
            "--profile", "openai,imagerag-paper", "--metrics", "vlmscore", "--json"]  # fmt: skip
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == {"n": 1, "metrics": {"vlmscore": {"draft": 0.7, "final": 0.7}}}
    decision, judged = openai_server.requests_to("/v1/chat/completions")
    assert "only answer yes or no" in json.dumps(decision.json["messages"])  # the paper's critic
    assert "How well does this image match" in json.dumps(judged.json["messages"])
    settings = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert settings["knobs"]["critic"] == "paper" and settings["metrics"] == {"vlmscore": "openai:gpt-4.1-mini"}
