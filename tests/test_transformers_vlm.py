"""The local transformers VLM backend, on tiny random Qwen2-VL and SmolVLM checkpoints saved to disk and loaded back."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from imageloop import runtime, tiny
from imageloop.agents.critic import CriticVerdict
from imageloop.agents.structured import ask_structured, json_schema_for
from imageloop.agents.vlms.batching import BatchingVisionLanguageModel
from imageloop.agents.vlms.transformers_local import TransformersVisionLanguageModel
from imageloop.backends import VLM_PROVIDERS, Placement
from imageloop.config import Endpoint
from imageloop.errors import ConfigError, ImageloopError, MalformedOutputError
from imageloop.graphs.imagerag import build_imagerag_graph
from imageloop.prompts import REPAIR_PROMPT
from imageloop.protocols import GREEDY, ChatCall, Decoding, Message
from imageloop.tiny.vlm import build_qwen2_vl, build_smolvlm
from imageloop.tools.artifacts import ArtifactStore
from tests.fakes import ScriptedGenerator, ScriptedRetriever, ScriptedVLM


@pytest.fixture(scope="session")
def qwen2_vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-qwen2-vl")
    build_qwen2_vl(directory)
    return directory


@pytest.fixture(scope="session")
def smolvlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-smolvlm")
    build_smolvlm(directory)
    return directory


class GenerateSpy:
    """Wraps `model.generate`: records the inputs of every call and passes them through."""

    def __init__(self, generate: Callable[..., Any]) -> None:
        self.generate = generate
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        return self.generate(**kwargs)


@pytest.fixture
def vlm(qwen2_vl_dir: Path) -> TransformersVisionLanguageModel:
    return TransformersVisionLanguageModel(str(qwen2_vl_dir), device="cpu", max_new_tokens=8)


@pytest.fixture
def spy(vlm: TransformersVisionLanguageModel, monkeypatch: pytest.MonkeyPatch) -> Iterator[GenerateSpy]:
    spy = GenerateSpy(vlm.network.generate)
    monkeypatch.setattr(vlm.network, "generate", spy)
    yield spy


def picture(tmp_path: Path, name: str, size: tuple[int, int], colour: tuple[int, int, int]) -> Path:
    path = tmp_path / name
    Image.new("RGB", size, colour).save(path)
    return path


def rendered(vlm: TransformersVisionLanguageModel, call: dict[str, Any]) -> str:
    """The exact prompt the model saw, special tokens included."""
    text: str = vlm.processor.tokenizer.decode(call["input_ids"][0], skip_special_tokens=False)
    return text


def test_saved_checkpoint_loads_once_through_from_pretrained(qwen2_vl_dir: Path) -> None:
    first = TransformersVisionLanguageModel(str(qwen2_vl_dir), device="cpu")
    second = TransformersVisionLanguageModel(str(qwen2_vl_dir), device="cpu")
    assert first.model_id == f"transformers:{qwen2_vl_dir}"
    assert type(first.network).__name__ == "Qwen2VLForConditionalGeneration"
    assert type(first.processor).__name__ == "Qwen2VLProcessor"
    assert second.network is first.network
    assert first.dtype == torch.float32


def test_each_image_reaches_the_model_in_order_as_its_own_image_tokens(
    vlm: TransformersVisionLanguageModel, spy: GenerateSpy, tmp_path: Path
) -> None:
    small = picture(tmp_path, "small.png", (28, 28), (255, 0, 0))
    large = picture(tmp_path, "large.png", (56, 56), (0, 0, 255))
    vlm.chat([Message("user", "Compare these.", (small, large))])
    (call,) = spy.calls
    # 28 px per merged 2x2 patch group: the small picture is one image token, the large one four.
    assert call["image_grid_thw"].tolist() == [[1, 2, 2], [1, 4, 4]]
    assert call["pixel_values"].shape[0] == 4 + 16
    one, four = "<|image_pad|>", "<|image_pad|>" * 4
    expected = f"Compare these.<|vision_start|>{one}<|vision_end|><|vision_start|>{four}<|vision_end|>"
    assert expected in rendered(vlm, call)


def test_images_are_downscaled_to_max_image_side(
    vlm: TransformersVisionLanguageModel, spy: GenerateSpy, tmp_path: Path
) -> None:
    vlm.max_image_side = 28
    vlm.chat([Message("user", "What is this?", (picture(tmp_path, "big.png", (56, 56), (0, 255, 0)),))])
    assert spy.calls[0]["image_grid_thw"].tolist() == [[1, 2, 2]]


def test_chat_template_renders_system_user_and_assistant_turns(
    vlm: TransformersVisionLanguageModel, spy: GenerateSpy, tmp_path: Path
) -> None:
    cat = picture(tmp_path, "cat.png", (28, 28), (9, 9, 9))
    vlm.chat(
        [
            Message("system", "Be brief."),
            Message("user", "What is this?", (cat,)),
            Message("assistant", "A cat."),
            Message("user", "And its colour?"),
        ]
    )
    assert rendered(vlm, spy.calls[0]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is this?<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nAnd its colour?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_decoding_is_greedy_at_the_requested_length(vlm: TransformersVisionLanguageModel, spy: GenerateSpy) -> None:
    vlm.chat([Message("user", "Hello")])
    assert spy.calls[0]["do_sample"] is False
    assert spy.calls[0]["max_new_tokens"] == 8


def test_sampling_uses_the_papers_knobs_and_a_seed_repeats_the_answer(
    vlm: TransformersVisionLanguageModel, spy: GenerateSpy
) -> None:
    paper = Decoding(temperature=0.7, top_p=0.9, repetition_penalty=1.1, seed=5)
    first = vlm.chat([Message("user", "Hello")], decoding=paper)
    again = vlm.chat([Message("user", "Hello")], decoding=paper)
    call = spy.calls[0]
    # generate picks greedily what each row's own decoding drew: the knobs live in RowDecoding.
    assert (call["do_sample"], call["repetition_penalty"]) == (False, 1.0)
    (rows,) = call["logits_processor"]
    ((pad, steps, generator),) = rows.rows
    assert [type(s).__name__ for s in steps] == [
        "RepetitionPenaltyLogitsProcessor",
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
    ]
    assert (steps[0].penalty, steps[1].temperature, steps[2].top_k, steps[3].top_p) == (1.1, 0.7, 50, 0.9)
    assert pad == 0 and generator is not None
    assert first == again


def test_sampling_draws_from_the_seed(vlm: TransformersVisionLanguageModel) -> None:
    vlm.max_new_tokens = 24
    hello = [Message("user", "Hello")]
    answers = {vlm.chat(hello, decoding=Decoding(temperature=1.0, seed=seed)) for seed in range(3)}
    assert len(answers) == 3
    assert vlm.chat(hello) not in answers


def test_greedy_answers_repeat_across_calls_and_after_a_reload(qwen2_vl_dir: Path, tmp_path: Path) -> None:
    messages = [Message("user", "Describe it.", (picture(tmp_path, "p.png", (40, 30), (1, 2, 3)),))]
    vlm = TransformersVisionLanguageModel(str(qwen2_vl_dir), device="cpu", max_new_tokens=12)
    first = vlm.chat(messages)
    assert vlm.chat(messages) == first
    runtime.clear_cache()
    reloaded = TransformersVisionLanguageModel(str(qwen2_vl_dir), device="cpu", max_new_tokens=12)
    assert reloaded.network is not vlm.network
    assert reloaded.chat(messages) == first


def test_a_json_schema_goes_into_the_system_turn_and_the_answer_opens_an_object(
    vlm: TransformersVisionLanguageModel, spy: GenerateSpy
) -> None:
    answer = vlm.chat([Message("system", "You judge."), Message("user", "Judge.")], json_schema_for(CriticVerdict))
    assert answer.startswith("{")
    prompt = rendered(vlm, spy.calls[0])
    assert prompt.startswith("<|im_start|>system\nYou judge.\n\nAnswer with only a JSON object")
    assert '"missing_concepts"' in prompt.split("<|im_end|>")[0]
    assert prompt.endswith("<|im_start|>assistant\n{")


def test_a_random_models_answer_fails_after_exactly_one_repair(
    vlm: TransformersVisionLanguageModel, spy: GenerateSpy
) -> None:
    with pytest.raises(MalformedOutputError, match="after one repair retry"):
        ask_structured(vlm, [Message("user", "Is the image aligned?")], CriticVerdict)
    assert len(spy.calls) == 2
    repair = rendered(vlm, spy.calls[1])
    assert "<|im_start|>assistant\n{" in repair.split("<|im_start|>user")[1]  # the first answer, replayed
    assert REPAIR_PROMPT.split("{error}")[0] in repair


def test_imagerag_falls_back_to_the_raw_prompt_when_the_local_critic_answers_noise(
    vlm: TransformersVisionLanguageModel, spy: GenerateSpy, tmp_path: Path
) -> None:
    prompt = "a Cyanocitta cristata perched on a snowy branch"
    retriever = ScriptedRetriever({}, root=tmp_path)
    graph = build_imagerag_graph(vlm, ScriptedGenerator(), retriever, ArtifactStore(tmp_path / "artifacts"))
    state = graph.invoke({"prompt": prompt}, version="v2").value
    critic = next(step for step in state["steps"] if step["node"] == "critic")
    assert "raw prompt" in critic["decision"]
    assert retriever.queries == [prompt]
    assert len(spy.calls) == 2


def test_smolvlm_sees_each_image_as_its_image_sequence(
    smolvlm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vlm = TransformersVisionLanguageModel(str(smolvlm_dir), device="cpu", max_new_tokens=6)
    spy = GenerateSpy(vlm.network.generate)
    monkeypatch.setattr(vlm.network, "generate", spy)
    a, b = picture(tmp_path, "a.png", (64, 48), (200, 0, 0)), picture(tmp_path, "b.png", (20, 40), (0, 200, 0))
    answer = vlm.chat([Message("system", "Be brief."), Message("user", "Compare.", (a, b))])
    (call,) = spy.calls
    assert isinstance(answer, str)
    assert call["pixel_values"].shape[:2] == (1, 2)
    image_token_id = vlm.processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((call["input_ids"] == image_token_id).sum()) == 2 * vlm.processor.image_seq_len
    assert rendered(vlm, call).startswith("<|im_start|>System: Be brief.<end_of_utterance>\nUser: Compare.")


# --- batches: concurrent calls answered in one left-padded generate -------------------------------------

PAPER = Decoding(temperature=0.7, top_p=0.9, repetition_penalty=1.1, seed=5)
MIXED_DECODINGS = [Decoding(), Decoding(repetition_penalty=1.3), PAPER, Decoding(temperature=1.2, seed=9)]


def mixed_calls(tmp_path: Path) -> list[ChatCall]:
    """Four one-picture calls: prompts and pictures of different sizes (so rows pad differently), each decoding."""
    texts = ["Describe it.", "What is in this picture, in detail?", "Hi.", "Is it a bird or a very large cat?"]
    calls = []
    for i, (text, decoding) in enumerate(zip(texts, MIXED_DECODINGS, strict=True)):
        image = picture(tmp_path, f"p{i}.png", (28 + 14 * i, 28 + 28 * i), (60 * i, 90, 9))
        calls.append(ChatCall([Message("user", text, (image,))], None, decoding))
    return calls


def same_length_calls(tmp_path: Path) -> list[ChatCall]:
    """Four one-picture calls whose prompts and pictures have one size (a CPU batches only those), each decoding."""
    calls = []
    for i, decoding in enumerate(MIXED_DECODINGS):
        image = picture(tmp_path, f"s{i}.png", (56, 56), (60 * i, 90, 9))
        calls.append(ChatCall([Message("user", f"Describe picture number {i}.", (image,))], None, decoding))
    return calls


@pytest.mark.parametrize("family", ["qwen2-vl", "smolvlm"])
def test_a_batch_answers_each_call_as_it_is_answered_alone(
    family: str, qwen2_vl_dir: Path, smolvlm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = qwen2_vl_dir if family == "qwen2-vl" else smolvlm_dir
    vlm = TransformersVisionLanguageModel(str(directory), device="cpu", max_new_tokens=16)
    calls = mixed_calls(tmp_path)
    alone = [vlm.chat(c.messages, c.json_schema, c.decoding) for c in calls]
    spy = GenerateSpy(vlm.network.generate)
    monkeypatch.setattr(vlm.network, "generate", spy)
    assert vlm.chat_batch(calls) == alone
    (call,) = spy.calls
    mask = call["attention_mask"]
    assert mask.shape[0] == 4 and not mask[:, 0].all() and mask[:, -1].all()  # left-padded rows


def test_a_local_answer_counts_its_tokens_as_a_provider_would_batched_or_alone(
    vlm: TransformersVisionLanguageModel, spy: GenerateSpy, tmp_path: Path
) -> None:
    calls = mixed_calls(tmp_path)
    alone = [vlm.chat(c.messages, c.json_schema, c.decoding) for c in calls]
    prompts = [int(call["input_ids"].shape[1]) for call in spy.calls]  # each prompt, image tokens included
    batched = vlm.chat_batch(calls)
    assert [getattr(a, "usage", None) for a in batched] == [getattr(a, "usage", None) for a in alone]  # no padding
    assert [a.usage.input_tokens for a in alone] == prompts  # type: ignore[attr-defined]
    assert all(0 < a.usage.output_tokens <= vlm.max_new_tokens for a in alone)  # type: ignore[attr-defined]


def test_sampled_answers_in_a_batch_come_from_each_calls_own_seed(
    vlm: TransformersVisionLanguageModel, tmp_path: Path
) -> None:
    calls = mixed_calls(tmp_path)
    reseeded = [ChatCall(c.messages, None, Decoding(temperature=1.2, seed=10)) for c in calls]
    first, second = vlm.chat_batch(calls), vlm.chat_batch([calls[0], calls[1], calls[2], reseeded[3]])
    assert first[:3] == second[:3]  # the other rows' draws never touch these
    assert first[3] != second[3]


def test_concurrent_chat_calls_share_one_generate_and_each_caller_gets_its_answer(
    vlm: TransformersVisionLanguageModel, spy: GenerateSpy, tmp_path: Path
) -> None:
    calls = same_length_calls(tmp_path)
    expected = vlm.chat_batch(calls)
    spy.calls.clear()
    batching = BatchingVisionLanguageModel(vlm)
    with ThreadPoolExecutor(4) as pool:
        with runtime.device_lock:  # another model is running: all four calls queue for one pass
            futures = [pool.submit(batching.chat, c.messages, c.json_schema, c.decoding) for c in calls]
            time.sleep(0.2)
        assert [f.result() for f in futures] == expected
    assert len(spy.calls) == 1


def key(
    vlm: TransformersVisionLanguageModel, text: str, images: tuple[Path, ...], decoding: Decoding = GREEDY
) -> Hashable:
    return vlm.batch_key(ChatCall([Message("user", text, images)], None, decoding))


def test_on_a_gpu_calls_with_as_many_images_and_prompts_of_similar_length_share_a_pass(
    vlm: TransformersVisionLanguageModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vlm, "device", "cuda")
    one, big = picture(tmp_path, "one.png", (28, 28), (1, 2, 3)), picture(tmp_path, "big.png", (56, 84), (1, 2, 3))
    assert len({key(vlm, "Describe it.", images) for images in [(), (one,), (one, one)]}) == 3
    assert key(vlm, "Describe the picture " + "a" * 90, (one,)) == key(vlm, "Say " + "b" * 110, (big,), PAPER)
    assert key(vlm, "Describe it. " * 10, (one,)) != key(vlm, "Describe it. " * 20, (one,))  # padding would double it


def test_on_a_cpu_only_calls_of_one_prompt_length_and_picture_size_share_a_pass(
    vlm: TransformersVisionLanguageModel, tmp_path: Path
) -> None:
    one, other = picture(tmp_path, "one.png", (28, 28), (1, 2, 3)), picture(tmp_path, "other.png", (28, 28), (9, 9, 9))
    big = picture(tmp_path, "big.png", (56, 84), (1, 2, 3))
    assert key(vlm, "Describe picture 1.", (one,)) == key(vlm, "Describe picture 2.", (other,), PAPER)
    assert key(vlm, "Describe picture 1.", (one,)) != key(vlm, "Describe picture 10.", (one,))
    assert key(vlm, "Describe picture 1.", (one,)) != key(vlm, "Describe picture 1.", (big,))
    assert len({key(vlm, "Describe it.", images) for images in [(), (one,), (one, one)]}) == 3


def test_a_batch_that_runs_out_of_memory_is_split_and_every_call_answered(
    vlm: TransformersVisionLanguageModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = same_length_calls(tmp_path)
    expected = vlm.chat_batch(calls)
    generate, rows = vlm.network.generate, []

    def fits_two(**kwargs: Any) -> Any:
        rows.append(kwargs["input_ids"].shape[0])
        if rows[-1] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return generate(**kwargs)

    monkeypatch.setattr(vlm.network, "generate", fits_two)
    batching = BatchingVisionLanguageModel(vlm)
    with ThreadPoolExecutor(4) as pool:
        with runtime.device_lock:
            futures = [pool.submit(batching.chat, c.messages, c.json_schema, c.decoding) for c in calls]
            time.sleep(0.2)
        assert [f.result() for f in futures] == expected
    assert rows == [4, 2, 2]


def test_a_vlm_that_cannot_batch_is_called_directly() -> None:
    inner = ScriptedVLM(["an answer"])
    wrapper = BatchingVisionLanguageModel(inner)
    assert wrapper.chat([Message("user", "hi")], decoding=PAPER) == "an answer"
    assert inner.decodings == [PAPER] and wrapper.model_id == inner.model_id


def test_tiny_builds_are_identical_across_builds(qwen2_vl_dir: Path, tmp_path: Path) -> None:
    build_qwen2_vl(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == (qwen2_vl_dir / "model.safetensors").read_bytes()


def test_tiny_provider_builds_into_the_tiny_cache_and_says_its_answers_are_noise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMAGELOOP_TINY_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny, "_noticed", False)
    vlm = VLM_PROVIDERS["tiny"]("qwen2-vl", Endpoint(), Placement(device="cpu"))
    assert vlm.model_id == "tiny:qwen2-vl"
    assert (tmp_path / "vlm-qwen2-vl" / "chat_template.jinja").exists()
    assert isinstance(vlm.chat([Message("user", "hi")]), str)
    assert tiny.NOISE_NOTICE in capsys.readouterr().err


def test_unknown_tiny_vlm_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="tiny:qwen2-vl, tiny:smolvlm"):
        VLM_PROVIDERS["tiny"]("llava", Endpoint(), Placement(device="cpu"))


def test_unknown_repo_fails_fast_offline_saying_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The hub reads the variable once, at import; without this a missing model costs minutes of retries.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"HF_HUB_OFFLINE is set.*hf download imageloop-test/no-such-vlm"):
        VLM_PROVIDERS["transformers"]("imageloop-test/no-such-vlm", Endpoint(), Placement(device="cpu"))
    assert time.perf_counter() - started < 5


def test_a_checkpoint_without_chat_template_is_refused(qwen2_vl_dir: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(qwen2_vl_dir, base)
    (base / "chat_template.jinja").unlink()
    with pytest.raises(ConfigError, match="no chat template"):
        TransformersVisionLanguageModel(str(base), device="cpu")


def test_out_of_memory_names_the_knobs_to_turn(
    vlm: TransformersVisionLanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    def exhausted(**kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(vlm.network, "generate", exhausted)
    with pytest.raises(ImageloopError, match=r"out of GPU memory while running transformers:.*`dtype`"):
        vlm.chat([Message("user", "hi")])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_model_runs_in_half_precision(qwen2_vl_dir: Path, tmp_path: Path) -> None:
    vlm = TransformersVisionLanguageModel(str(qwen2_vl_dir), max_new_tokens=8)
    assert vlm.device == "cuda" and vlm.dtype in (torch.bfloat16, torch.float16)
    assert next(vlm.network.parameters()).dtype == vlm.dtype
    answer = vlm.chat([Message("user", "What?", (picture(tmp_path, "p.png", (56, 56), (5, 5, 5)),))], {"schema": {}})
    assert answer.startswith("{")
