"""A chat agent that uses imageloop as tools: it indexes your photos, searches them, draws with them as
references (ImageRAG), and runs a round-by-round search for the image you have in mind (GenIR).

Any LangChain chat model that can call tools works; the imageloop backends are configured separately
(`--profile`, `IMAGELOOP_*` variables), exactly as for the `imageloop` command. For example, with OpenAI:

    pip install -e ".[agent]" langchain-openai     # or langchain-anthropic, langchain-ollama, ...
    export OPENAI_API_KEY=sk-...
    python examples/agent.py --model openai:gpt-4.1-mini --profile openai --images ./my_images

then type requests such as "index my photos", "draw a blue jay on a snowy branch using my photos as
references" or "help me find the photo of the red car I took last winter". Each tool's answer gives the
model a short text; the paths, scores and run ids it carries as its artifact are printed here, for you.
Runs (with their `report.html`) and search sessions go to `--runs` (default `./runs/agent`).
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Checkpointer

from imageloop.config import Settings, load_settings
from imageloop.errors import ImageloopError
from imageloop.langchain_tools import imageloop_tools

SYSTEM_PROMPT = """You help a person work with their image collection at {images}.
Tools: index_images (once per folder, before anything else), retrieve_images, generate_with_references,
get_run, and genir_round / genir_feedback for finding an image the person has in mind: after each
round, describe the results briefly, ask the person what differs from the image they want (or which
result it is), and pass their words to genir_feedback unchanged. Never invent paths or ids."""


def build_agent(
    model: str | BaseChatModel,
    settings: Settings,
    images: Path,
    runs_dir: Path,
    checkpointer: Checkpointer = None,
) -> Any:
    """A LangGraph agent over the imageloop tools, allowed to touch `images` only."""
    tools = imageloop_tools(settings, roots=[images], runs_dir=runs_dir)
    prompt = SYSTEM_PROMPT.format(images=images.resolve())
    return create_agent(model, tools, system_prompt=prompt, checkpointer=checkpointer)


def show_artifacts(messages: Sequence[Any]) -> None:
    """Print what the tools handed back beyond their text: files to open, ids to keep."""
    for message in messages:
        if not isinstance(message, ToolMessage) or not message.artifact:
            continue
        artifact = message.artifact.get("result") or message.artifact  # a run's result, or a search's answer
        keys = ("run_id", "final_image", "report", "session_id", "synthetic_image", "page", "found_path")
        for key in keys:
            if artifact.get(key):
                print(f"  [{message.name}] {key}: {artifact[key]}")
        for result in artifact.get("results") or artifact.get("retrieved") or []:
            print(f"  [{message.name}] {result['score']:.3f} {result['path']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a chat model, PROVIDER:MODEL as init_chat_model takes it")
    parser.add_argument("--images", type=Path, required=True, help="the folder of images the agent may use")
    parser.add_argument("--runs", type=Path, default=Path("runs/agent"), help="where runs and sessions go")
    parser.add_argument("--profile", help="imageloop backends profile, e.g. openai (or IMAGELOOP_* variables)")
    args = parser.parse_args(argv)
    try:
        agent = build_agent(args.model, load_settings(args.profile), args.images, args.runs, InMemorySaver())
    except ImageloopError as e:
        print(f"agent: error: {e}", file=sys.stderr)
        return 2
    config = {"configurable": {"thread_id": uuid.uuid4().hex}}
    print("Ask for something (an empty line ends).")
    while True:
        try:
            request = input("> ").strip()
        except EOFError:
            return 0
        if not request:
            return 0
        before = len(agent.get_state(config).values.get("messages", []))
        state = agent.invoke({"messages": [{"role": "user", "content": request}]}, config)
        new = state["messages"][before:]
        show_artifacts(new)
        reply = next((m for m in reversed(new) if isinstance(m, AIMessage)), None)
        print(reply.text if reply is not None else "(no answer)")


if __name__ == "__main__":
    sys.exit(main())
