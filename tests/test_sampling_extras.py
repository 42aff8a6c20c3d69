"""Sampling fields beyond OpenAI's API (vLLM's `repetition_penalty`) reach only the endpoints that take them."""

from __future__ import annotations

import logging

import pytest

import imageloop.openai_client as openai_client
from imageloop.agents.vlms.openai_compatible import OpenAIVisionLanguageModel
from imageloop.config import Endpoint
from imageloop.protocols import Decoding, Message
from tests.fake_openai_server import FakeOpenAIServer, error_body

CHAT = "/v1/chat/completions"


def test_the_papers_sampling_extras_are_dropped_once_for_an_endpoint_that_refuses_them(
    openai_server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(openai_client, "_refused_extras", {})
    refusal = error_body("Unrecognized request argument supplied: repetition_penalty")
    openai_server.push(CHAT, 400, refusal)
    endpoint = Endpoint(base_url=openai_server.base_url, api_key="sk-test")
    paper = Decoding(temperature=0.7, top_p=0.9, repetition_penalty=1.1)
    with caplog.at_level(logging.WARNING, logger="imageloop.openai_client"):
        for vlm in (OpenAIVisionLanguageModel("gpt-test", endpoint), OpenAIVisionLanguageModel("gpt-test", endpoint)):
            vlm.chat([Message("user", "describe")], decoding=paper)
    sent = [request.json for request in openai_server.requests_to(CHAT)]
    assert ["repetition_penalty" in body for body in sent] == [True, False, False]
    assert all(body["top_p"] == 0.9 for body in sent)
    said = [r.getMessage() for r in caplog.records if "repetition_penalty" in r.getMessage()]
    assert said == [f"{openai_server.base_url} does not take `repetition_penalty` (HTTP 400): sending requests "
                    "without it from now on"]  # fmt: skip


def test_a_refusal_is_remembered_for_its_endpoint_only(
    openai_server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(openai_client, "_refused_extras", {})
    openai_server.push(CHAT, 400, error_body("Unrecognized request argument supplied: repetition_penalty"))
    paper = Decoding(temperature=0.7, top_p=0.9, repetition_penalty=1.1)
    with FakeOpenAIServer() as vllm:
        for server in (openai_server, vllm):
            vlm = OpenAIVisionLanguageModel("gpt-test", Endpoint(base_url=server.base_url, api_key="sk-test"))
            vlm.chat([Message("user", "describe")], decoding=paper)
        assert vllm.requests_to(CHAT)[0].json["repetition_penalty"] == 1.1
