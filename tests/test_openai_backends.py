"""The OpenAI-compatible backends, end to end against a real local HTTP server speaking the API."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import BaseModel

from imageloop.agents.structured import ask_structured, json_schema_for
from imageloop.agents.vlms.openai_compatible import OpenAIVisionLanguageModel
from imageloop.config import Endpoint, Settings, load_settings
from imageloop.errors import BackendError, ConfigError, MalformedOutputError
from imageloop.openai_client import make_client
from imageloop.protocols import Decoding, GenerationRequest, Message, PromptTemplate, ReferenceImage
from imageloop.tools.embedders.openai_compatible import OpenAITextEmbedder
from imageloop.tools.generators.openai_images import OpenAIImageGenerator
from imageloop.tools.images import png_bytes
from tests.fake_openai_server import FakeOpenAIServer, chat_completion, error_body, hash_vector

CHAT = "/v1/chat/completions"
EDITS = "/v1/images/edits"
GENERATIONS = "/v1/images/generations"
EMBEDDINGS = "/v1/embeddings"


class Verdict(BaseModel):
    aligned: bool
    missing_concepts: list[str]


def write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def decode_data_uri(uri: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    raw = base64.b64decode(uri[len(prefix) :])
    assert raw.startswith(b"\x89PNG")
    return Image.open(io.BytesIO(raw))


def vlm_for(server: FakeOpenAIServer) -> OpenAIVisionLanguageModel:
    return OpenAIVisionLanguageModel("gpt-test", Endpoint(base_url=server.base_url, api_key="sk-test"))


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# --- vision-language model -----------------------------------------------------------------------


def test_images_reach_chat_completions_as_png_data_uris_in_order_after_the_text(
    openai_server: FakeOpenAIServer, tmp_path: Path
) -> None:
    red = write_image(tmp_path / "red.png", (255, 0, 0))
    wide_blue = write_image(tmp_path / "blue.jpg", (0, 0, 255), size=(2048, 64))
    vlm = OpenAIVisionLanguageModel("gpt-test", Endpoint(base_url=openai_server.base_url), max_image_side=512)

    vlm.chat([Message("system", "be brief"), Message("user", "compare", (red, wide_blue))])

    body = openai_server.requests_to(CHAT)[0].json
    assert body["model"] == "gpt-test"
    assert body["temperature"] == 0
    assert body["messages"][0] == {"role": "system", "content": "be brief"}
    text, first, second = body["messages"][1]["content"]
    assert text == {"type": "text", "text": "compare"}
    assert decode_data_uri(first["image_url"]["url"]).convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    downscaled = decode_data_uri(second["image_url"]["url"])
    assert max(downscaled.size) == 512
    np.testing.assert_allclose(np.asarray(downscaled.convert("RGB"))[0, 0], (0, 0, 255), atol=8)  # JPEG


def test_response_format_carries_the_json_schema(openai_server: FakeOpenAIServer) -> None:
    schema = json_schema_for(Verdict)

    vlm_for(openai_server).chat([Message("user", "judge")], json_schema=schema)

    body = openai_server.requests_to(CHAT)[0].json
    assert body["response_format"] == {"type": "json_schema", "json_schema": schema}


def test_chat_is_greedy_by_default_and_samples_as_asked(openai_server: FakeOpenAIServer) -> None:
    vlm = vlm_for(openai_server)
    vlm.chat([Message("user", "describe")])
    vlm.chat(
        [Message("user", "describe")], decoding=Decoding(temperature=0.7, top_p=0.9, repetition_penalty=1.1, seed=3)
    )

    greedy, sampled = (request.json for request in openai_server.requests_to(CHAT))
    assert greedy["temperature"] == 0 and "top_p" not in greedy and "repetition_penalty" not in greedy
    assert (sampled["temperature"], sampled["top_p"], sampled["seed"]) == (0.7, 0.9, 3)
    assert sampled["repetition_penalty"] == 1.1  # vLLM reads it from the body


def test_no_response_format_without_a_schema(openai_server: FakeOpenAIServer) -> None:
    vlm_for(openai_server).chat([Message("user", "describe")])

    assert "response_format" not in openai_server.requests_to(CHAT)[0].json


def test_a_400_about_response_format_falls_back_to_plain_and_later_calls_skip_it(
    openai_server: FakeOpenAIServer,
) -> None:
    openai_server.push(CHAT, 400, error_body("response_format json_schema is not supported", param="response_format"))
    openai_server.push(CHAT, 200, chat_completion('{"aligned": true, "missing_concepts": []}'))
    vlm = vlm_for(openai_server)
    schema = json_schema_for(Verdict)

    first = vlm.chat([Message("user", "judge")], json_schema=schema)
    vlm.chat([Message("user", "judge again")], json_schema=schema)

    assert first == '{"aligned": true, "missing_concepts": []}'
    sent = [r.json for r in openai_server.requests_to(CHAT)]
    assert ["response_format" in body for body in sent] == [True, False, False]
    assert sent[0]["messages"] == sent[1]["messages"]


def test_a_422_about_json_schema_also_falls_back(openai_server: FakeOpenAIServer) -> None:
    openai_server.push(CHAT, 422, {"detail": "unknown field json_schema"})

    vlm_for(openai_server).chat([Message("user", "judge")], json_schema=json_schema_for(Verdict))

    assert ["response_format" in r.json for r in openai_server.requests_to(CHAT)] == [True, False]


def test_other_400s_are_reported_not_retried_without_response_format(openai_server: FakeOpenAIServer) -> None:
    openai_server.push(CHAT, 400, error_body("context length exceeded"))

    with pytest.raises(BackendError, match="HTTP 400: context length exceeded"):
        vlm_for(openai_server).chat([Message("user", "judge")], json_schema=json_schema_for(Verdict))
    assert len(openai_server.requests_to(CHAT)) == 1


def test_ask_structured_repairs_one_malformed_answer_through_the_server(openai_server: FakeOpenAIServer) -> None:
    openai_server.push(CHAT, 200, chat_completion("the image looks fine"))
    openai_server.push(CHAT, 200, chat_completion('{"aligned": false, "missing_concepts": ["blue jay"]}'))

    verdict = ask_structured(vlm_for(openai_server), [Message("user", "judge")], Verdict)

    assert verdict == Verdict(aligned=False, missing_concepts=["blue jay"])
    repair_messages = openai_server.requests_to(CHAT)[1].json["messages"]
    assert repair_messages[1] == {"role": "assistant", "content": "the image looks fine"}
    assert "could not be used" in repair_messages[2]["content"]


def test_ask_structured_raises_after_two_malformed_answers(openai_server: FakeOpenAIServer) -> None:
    openai_server.push(CHAT, 200, chat_completion("no"))
    openai_server.push(CHAT, 200, chat_completion('{"aligned": "maybe"}'))

    with pytest.raises(MalformedOutputError, match="openai:gpt-test gave no valid Verdict"):
        ask_structured(vlm_for(openai_server), [Message("user", "judge")], Verdict)
    assert len(openai_server.requests_to(CHAT)) == 2


def test_a_refusal_raises_malformed_output_error(openai_server: FakeOpenAIServer) -> None:
    openai_server.push(CHAT, 200, chat_completion(None, refusal="I can't help with that."))

    with pytest.raises(MalformedOutputError, match="refused to answer: I can't help with that"):
        vlm_for(openai_server).chat([Message("user", "judge")], json_schema=json_schema_for(Verdict))


# --- image generator -----------------------------------------------------------------------------


def test_images_edit_gets_the_reference_pngs_in_order_and_the_rendered_prompt(
    openai_server: FakeOpenAIServer, tmp_path: Path
) -> None:
    jay = write_image(tmp_path / "jay.jpg", (0, 0, 255))
    print_ = write_image(tmp_path / "print.png", (250, 240, 200))
    generator = OpenAIImageGenerator(endpoint=Endpoint(base_url=openai_server.base_url))
    references = (
        ReferenceImage(jay, "blue jay", caption="a blue jay perched on a branch"),
        ReferenceImage(print_, "ukiyo-e style"),  # no retrieval caption: named by its concept
    )

    result = generator.generate(GenerationRequest("a blue jay on a branch, ukiyo-e style", references))

    expected_prompt = (
        "According to these images of a blue jay perched on a branch: image 1, ukiyo-e style: image 2, "
        "generate a blue jay on a branch, ukiyo-e style"
    )
    assert result.prompt_used == expected_prompt
    assert openai_server.requests_to(GENERATIONS) == []
    request = openai_server.requests_to(EDITS)[0]
    sent = request.fields("image[]")
    assert [part.content for part in sent] == [
        png_bytes(Image.open(jay).convert("RGB")),
        png_bytes(Image.open(print_).convert("RGB")),
    ]
    assert all(part.filename and part.filename.endswith(".png") for part in sent)
    assert request.fields("prompt")[0].content.decode() == expected_prompt
    assert request.fields("model")[0].content == b"gpt-image-1"
    assert result.image.size == (8, 8)


def test_images_edit_verbatim_sends_the_prompt_unchanged_with_the_picks_in_order(
    openai_server: FakeOpenAIServer, tmp_path: Path
) -> None:
    picks = [write_image(tmp_path / f"pick{i}.png", (10 * i, 0, 0)) for i in range(3)]
    generator = OpenAIImageGenerator(endpoint=Endpoint(base_url=openai_server.base_url))
    references = tuple(ReferenceImage(path, "product", caption="a catalogue photo") for path in picks)

    result = generator.generate(GenerationRequest("the red sofa in a sunlit loft", references, template="verbatim"))

    request = openai_server.requests_to(EDITS)[0]
    assert request.fields("prompt")[0].content.decode() == "the red sofa in a sunlit loft" == result.prompt_used
    assert [part.content for part in request.fields("image[]")] == [
        png_bytes(Image.open(path).convert("RGB")) for path in picks
    ]
    assert result.notes == ()


@pytest.mark.parametrize(
    ("template", "kept", "how"),
    [
        ("verbatim", list(range(16)), "kept the first 16 as given, dropped pick16.png"),
        ("imagerag", list(range(1, 17)), "dropped the lowest-scoring pick0.png"),
    ],
)
def test_images_edit_takes_sixteen_references_and_notes_the_one_it_dropped(
    template: PromptTemplate, kept: list[int], how: str, openai_server: FakeOpenAIServer, tmp_path: Path
) -> None:
    picks = [write_image(tmp_path / f"pick{i}.png", (i, 0, 0)) for i in range(17)]
    references = tuple(ReferenceImage(path, f"c{i}", score=i / 100) for i, path in enumerate(picks))
    generator = OpenAIImageGenerator(endpoint=Endpoint(base_url=openai_server.base_url))

    result = generator.generate(GenerationRequest("a shelf of things", references, template=template))

    sent = openai_server.requests_to(EDITS)[0].fields("image[]")
    assert [part.content for part in sent] == [png_bytes(Image.open(picks[i]).convert("RGB")) for i in kept]
    (note,) = result.notes
    assert note.startswith("openai:gpt-image-1 takes at most 16 references: ") and how in note


def test_images_generate_is_used_when_there_are_no_references(openai_server: FakeOpenAIServer) -> None:
    generator = OpenAIImageGenerator(endpoint=Endpoint(base_url=openai_server.base_url), size="1024x1024")

    result = generator.generate(GenerationRequest("a red bicycle"))

    assert openai_server.requests_to(EDITS) == []
    body = openai_server.requests_to(GENERATIONS)[0].json
    assert body == {"model": "gpt-image-1", "prompt": "a red bicycle", "n": 1, "size": "1024x1024"}
    assert result.prompt_used == "a red bicycle"
    assert result.image.mode == "RGB"
    assert result.notes == ()


def test_request_size_overrides_the_constructor_size(openai_server: FakeOpenAIServer) -> None:
    generator = OpenAIImageGenerator(endpoint=Endpoint(base_url=openai_server.base_url), size="1024x1024")

    generator.generate(GenerationRequest("a red bicycle", size=(1536, 1024)))

    assert openai_server.requests_to(GENERATIONS)[0].json["size"] == "1536x1024"


def test_a_seed_is_noted_as_ignored(openai_server: FakeOpenAIServer) -> None:
    generator = OpenAIImageGenerator(endpoint=Endpoint(base_url=openai_server.base_url))

    result = generator.generate(GenerationRequest("a red bicycle", seed=7))

    assert result.notes == ("seed ignored by openai:gpt-image-1",)
    assert "seed" not in openai_server.requests_to(GENERATIONS)[0].json


def test_a_url_only_answer_asks_for_b64_output(openai_server: FakeOpenAIServer) -> None:
    openai_server.push(GENERATIONS, 200, {"created": 0, "data": [{"url": "https://example.invalid/x.png"}]})
    generator = OpenAIImageGenerator("dall-e-3", Endpoint(base_url=openai_server.base_url))

    with pytest.raises(BackendError, match="b64_json"):
        generator.generate(GenerationRequest("a red bicycle"))


# --- text embedder -------------------------------------------------------------------------------


def test_embeddings_are_unit_float32_rows_in_input_order(openai_server: FakeOpenAIServer) -> None:
    reversed_answer = {
        "object": "list",
        "model": "m",
        "data": [
            {"object": "embedding", "index": 1, "embedding": [0.0, 3.0]},
            {"object": "embedding", "index": 0, "embedding": [4.0, 0.0]},
        ],
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }
    openai_server.push(EMBEDDINGS, 200, reversed_answer)
    embedder = OpenAITextEmbedder("local-embed", Endpoint(base_url=openai_server.base_url))

    vectors = embedder.embed_texts(["first", "second"])

    assert vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, [[1.0, 0.0], [0.0, 1.0]])


def test_embeddings_are_batched_and_keep_input_order_across_batches(openai_server: FakeOpenAIServer) -> None:
    texts = ["a", "b", "c", "d", "e"]
    embedder = OpenAITextEmbedder("local-embed", Endpoint(base_url=openai_server.base_url), batch_size=2)

    vectors = embedder.embed_texts(texts)

    assert [r.json["input"] for r in openai_server.requests_to(EMBEDDINGS)] == [["a", "b"], ["c", "d"], ["e"]]
    expected = np.array([hash_vector(t, 8) for t in texts], dtype=np.float32)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(vectors, expected, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)


def test_dim_of_an_unknown_model_is_probed_once(openai_server: FakeOpenAIServer) -> None:
    embedder = OpenAITextEmbedder("local-embed", Endpoint(base_url=openai_server.base_url))

    assert (embedder.dim, embedder.dim) == (8, 8)
    assert len(openai_server.requests_to(EMBEDDINGS)) == 1


def test_dim_of_a_known_model_needs_no_call(openai_server: FakeOpenAIServer) -> None:
    embedder = OpenAITextEmbedder(endpoint=Endpoint(base_url=openai_server.base_url))

    assert (embedder.model_id, embedder.dim) == ("openai:text-embedding-3-small", 1536)
    assert openai_server.requests == []


def test_reduced_dimensions_are_requested_and_named_in_the_model_id(openai_server: FakeOpenAIServer) -> None:
    embedder = OpenAITextEmbedder("text-embedding-3-large", Endpoint(base_url=openai_server.base_url), dimensions=16)

    vectors = embedder.embed_texts(["a blue jay"])

    assert (embedder.model_id, embedder.dim, vectors.shape) == ("openai:text-embedding-3-large@16", 16, (1, 16))
    assert openai_server.requests_to(EMBEDDINGS)[0].json["dimensions"] == 16


def test_embed_images_points_to_the_caption_route() -> None:
    embedder = OpenAITextEmbedder(endpoint=Endpoint(base_url=closed_port_url()))

    with pytest.raises(ConfigError, match=r"embeds text only.*captions"):
        embedder.embed_images([Image.new("RGB", (4, 4))])


# --- client configuration and errors -------------------------------------------------------------


def test_an_unreachable_endpoint_raises_a_one_line_backend_error_naming_the_url() -> None:
    url = closed_port_url()
    vlm = OpenAIVisionLanguageModel("gpt-test", client=make_client(Endpoint(base_url=url, max_retries=1)))

    with pytest.raises(BackendError) as raised:
        vlm.chat([Message("user", "hello")])

    message = str(raised.value)
    assert message.startswith(f"cannot reach {url}")
    assert "chat with openai:gpt-test (after retries)" in message
    assert "\n" not in message


def test_a_401_becomes_a_one_line_backend_error(openai_server: FakeOpenAIServer) -> None:
    openai_server.push(EMBEDDINGS, 401, error_body("Incorrect API key\nprovided: sk-wrong.", "invalid_api_key"))
    embedder = OpenAITextEmbedder(endpoint=Endpoint(base_url=openai_server.base_url, api_key="sk-wrong"))

    with pytest.raises(BackendError) as raised:
        embedder.embed_texts(["a"])

    assert str(raised.value) == (
        f"{openai_server.base_url} rejected embeddings with openai:text-embedding-3-small: "
        "HTTP 401: Incorrect API key provided: sk-wrong."
    )


def test_the_api_key_reaches_the_authorization_header(openai_server: FakeOpenAIServer) -> None:
    vlm_for(openai_server).chat([Message("user", "hello")])

    assert openai_server.requests_to(CHAT)[0].headers["authorization"] == "Bearer sk-test"


def test_openai_env_variables_are_the_fallback(
    openai_server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")

    OpenAIVisionLanguageModel("gpt-test").chat([Message("user", "hello")])

    assert openai_server.requests_to(CHAT)[0].headers["authorization"] == "Bearer sk-env"


def test_a_local_server_needs_no_key(openai_server: FakeOpenAIServer) -> None:
    OpenAIVisionLanguageModel("llava", Endpoint(base_url=openai_server.base_url)).chat([Message("user", "hi")])

    assert openai_server.requests_to(CHAT)[0].headers["authorization"] == "Bearer not-needed"


def test_no_key_and_no_base_url_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)

    with pytest.raises(ConfigError, match="OPENAI_API_KEY is not set"):
        make_client(Endpoint())


def test_the_backend_modules_import_openai_lazily() -> None:
    code = (
        "import sys, json\n"
        "import imageloop.openai_client, imageloop.agents.vlms.openai_compatible\n"
        "import imageloop.tools.generators.openai_images, imageloop.tools.embedders.openai_compatible\n"
        "print(json.dumps('openai' in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout

    assert json.loads(out) is False


# --- concurrency: requests overlap, at most max_concurrent_requests per endpoint -------------------------------


def test_concurrent_calls_overlap_up_to_the_endpoints_bound(openai_server: FakeOpenAIServer) -> None:
    openai_server.latency_s = 0.2
    endpoint = Endpoint(base_url=openai_server.base_url, max_concurrent_requests=3)
    vlm = OpenAIVisionLanguageModel("gpt-test", endpoint)
    with ThreadPoolExecutor(9) as pool:
        answers = list(pool.map(lambda i: vlm.chat([Message("user", f"hello {i}")]), range(9)))
    assert len(answers) == 9 and len(openai_server.requests_to(CHAT)) == 9
    assert openai_server.max_in_flight == 3


def test_every_backend_on_one_endpoint_shares_its_bound(openai_server: FakeOpenAIServer) -> None:
    openai_server.latency_s = 0.2
    endpoint = Endpoint(base_url=openai_server.base_url, max_concurrent_requests=2)
    vlm = OpenAIVisionLanguageModel("gpt-test", endpoint)
    captioner = OpenAIVisionLanguageModel("another-model", endpoint)
    embedder = OpenAITextEmbedder("local-embed", endpoint)
    calls = [lambda: vlm.chat([Message("user", "hi")]), lambda: captioner.chat([Message("user", "hi")]),
             lambda: embedder.embed_texts(["hi"])] * 2  # fmt: skip
    with ThreadPoolExecutor(6) as pool:
        for future in [pool.submit(call) for call in calls]:
            future.result()
    assert openai_server.max_in_flight == 2


def test_the_bound_is_a_setting_that_reaches_each_roles_endpoint() -> None:
    assert Settings().endpoint("vlm").max_concurrent_requests == 8
    settings = load_settings(environ={"IMAGELOOP_MAX_CONCURRENT_REQUESTS": "32"})
    assert {settings.endpoint(role).max_concurrent_requests for role in ("vlm", "generator", "embedder")} == {32}
