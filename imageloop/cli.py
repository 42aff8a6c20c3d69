"""The `imageloop` command line: parses options, calls the application layer (`imageloop.app.App`), prints.

User errors print one line (`imageloop: error: ...`) and exit 2; Ctrl-C exits 130 (SIGTERM 143) after
saying what was kept and how to continue. Progress goes to stderr so `--json` output on stdout stays machine-readable.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from imageloop import __version__, limits
from imageloop.config import STORE_KINDS, ModelSettings, Settings, load_settings
from imageloop.errors import ConfigError, ImageloopError
from imageloop.knobs import (
    CIRKnobs,
    GenIREvalKnobs,
    GenIRKnobs,
    ImageRAGKnobs,
    RAGEKnobs,
    RayOptions,
    TripletsKnobs,
    describe_knob,
)
from imageloop.progress import ProgressEvent, describe
from imageloop.runtime import hide_loading_bars
from imageloop.tools.indexing.options import IndexOptions

if TYPE_CHECKING:
    from imageloop.app import App
    from imageloop.app.jobs import Followers
    from imageloop.app.results import RAGEView, SearchView
    from imageloop.graphs.steps import Step

EXIT_USER_ERROR = 2
EACH = "(default 1; with --ray: on each worker)"
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a filter stopped by its reader
EXIT_TERMINATED = 128 + signal.SIGTERM
SERVERS = ("mcp", "ui")
"""Commands that serve until stopped and handle SIGTERM themselves (finishing or cancelling their runs)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, taken as Ctrl-C is: the run stops, its record says so, and the message says how to continue."""


@contextmanager
def _sigterm_as_interrupt(command: str) -> Iterator[None]:
    """While `command` runs, SIGTERM raises `Terminated` (once: a second one waits for the record to be written)."""
    if command in SERVERS or threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _size(text: str) -> tuple[int, int]:
    try:
        return limits.parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _default(name: str) -> str:
    value = limits.default(name)
    return "per backend" if value is None else f"{value:g}"


ROLE_EXAMPLES = {
    "vlm": "openai:gpt-4.1-mini",
    "generator": "openai:gpt-image-1",
    "embedder": "openai:text-embedding-3-small",
    "captioner": "openai:gpt-4.1-mini (default: the --vlm)",
}


def _role_options(roles: Sequence[str] = tuple(ROLE_EXAMPLES)) -> argparse.ArgumentParser:
    """The model options of a command whose models play `roles` (a generator brings the diffusers options)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("models (PROVIDER:MODEL; see README for providers)")
    group.add_argument(
        "--profile",
        action="append",
        metavar="NAME[,NAME]",
        help="models (openai, local, tiny) and/or a paper preset (imagerag-paper, genir-paper), applied left to "
        "right: --profile openai,imagerag-paper",
    )
    for role in roles:
        group.add_argument(f"--{role}", metavar="PROVIDER:MODEL", help=f"e.g. {ROLE_EXAMPLES[role]}")
        group.add_argument(f"--{role}-base-url", metavar="URL", help=f"OpenAI-compatible endpoint for the {role}")
    group.add_argument(
        "--max-concurrent-requests",
        type=int,
        metavar="N",
        help=f"OpenAI-compatible endpoints: requests in flight, each (default {_default('max_concurrent_requests')})",
    )
    group.add_argument(
        "--max-batch", type=int, metavar="N",
        help="local models: requests merged into one batched call at most (default 8 pictures, 16 VLM turns, "
        "64 embedded items; fewer when a GPU's memory says so; $IMAGELOOP_MAX_BATCH)",
    )  # fmt: skip
    group.add_argument(
        "--request-timeout", type=float, metavar="SECONDS",
        help=f"remote calls: seconds one try may take (default {limits.REQUEST_TIMEOUT_S:g}; image generation "
        f"{limits.GENERATION_TIMEOUT_S:g}; $IMAGELOOP_REQUEST_TIMEOUT)",
    )  # fmt: skip
    group.add_argument(
        "--max-retries", type=int, metavar="N",
        help=f"remote calls: retries after a timeout, 429 or 5xx (default {_default('max_retries')}; "
        "$IMAGELOOP_MAX_RETRIES)",
    )  # fmt: skip
    group.add_argument("--device", help="local models: cuda, cuda:1, mps or cpu (default: best available)")
    group.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="local models (default per device)")
    if "generator" not in roles:
        return parent
    group.add_argument("--offload", action="store_true", default=None, help="diffusers: CPU offload to save VRAM")
    group.add_argument("--guidance-scale", type=float, help="diffusers: guidance scale (default per backend)")
    group.add_argument("--ip-adapter", metavar="REPO_OR_DIR", help="sdxl-ip-adapter: the adapter (h94/IP-Adapter)")
    group.add_argument(
        "--ip-adapter-weight",
        metavar="PATH",
        help="sdxl-ip-adapter: weight file in it (sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors)",
    )
    group.add_argument(
        "--ip-adapter-image-encoder", metavar="PATH", help="sdxl-ip-adapter: image encoder in it (models/image_encoder)"
    )
    group.add_argument("--ip-adapter-scale", type=float, help="sdxl-ip-adapter: reference strength (0.5, the paper's)")
    group.add_argument(
        "--flux-redux", metavar="REPO_OR_DIR", help="flux: Redux prior for references, or none (FLUX.1-Redux-dev)"
    )
    group.add_argument(
        "--sdxl-max-references", type=int, metavar="N", help="sdxl-ip-adapter: references per image (1-3; paper: 1)"
    )
    return parent


def _add_knobs(parser: argparse.ArgumentParser, knobs: type[BaseModel], title: str, **aliases: str) -> None:
    """A loop's knobs (or a job's options) as options, derived from their one declaration (`imageloop.knobs`):
    `--name-with-dashes`, its type and choices, and its description and default as help; unset, a knob takes
    the settings' value. `aliases` name an older spelling of an option (`auto_select="--auto"`)."""
    group = parser.add_argument_group(title)
    for name, info in knobs.model_fields.items():
        flags = [f"--{name.replace('_', '-')}", *([aliases[name]] if name in aliases else [])]
        group.add_argument(*flags, dest=name, default=None, help=describe_knob(info), **_option_kind(info.annotation))


def _option_kind(annotation: Any) -> dict[str, Any]:
    """How argparse reads a knob of this type: a flag pair, a choice, a number, a size or text."""
    optional = get_origin(annotation) in (Union, UnionType)
    kinds = [a for a in get_args(annotation) if a is not type(None)] if optional else [annotation]
    kind = get_args(kinds[0])[0] if get_origin(kinds[0]) is Annotated else kinds[0]
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if get_origin(kind) is Literal:
        return {"choices": get_args(kind)}
    if kind in (int, float):
        return {"type": kind, "metavar": "N" if kind is int else "X"}
    if kind == tuple[int, int]:
        return {"type": _size, "metavar": "WxH"}
    return {"metavar": "TEXT"}


def _given(args: argparse.Namespace, knobs: type[BaseModel]) -> dict[str, Any]:
    """The knobs (or options) this command line set (the rest take the settings')."""
    return {name: getattr(args, name) for name in knobs.model_fields if getattr(args, name, None) is not None}


def _add_ray(parser: argparse.ArgumentParser) -> None:
    """`--ray ADDRESS` and its workers' options, derived from `RayOptions`: the job on a Ray cluster."""
    _add_knobs(parser, RayOptions, "Ray cluster (the ray extra; README: Beyond one machine)")


def _add_cir_parser(commands: Any, roles: argparse.ArgumentParser) -> None:
    cir = commands.add_parser("cir", parents=[roles], help="find images showing a reference changed as a text says")
    cir.add_argument("--index", type=Path, required=True, help="an indexed image folder")
    cir.add_argument("--reference", type=Path, required=True, metavar="IMAGE", help="the reference image")
    cir.add_argument("--change", required=True, metavar="TEXT", help="what differs, e.g. 'the same dress but red'")
    _add_knobs(cir, CIRKnobs, "composed retrieval")
    cir.add_argument("--json", action="store_true", help='print {"edited_description", "results": [...]} last')


def _add_cir_eval_parser(loops: Any, roles: argparse.ArgumentParser) -> None:
    cir_eval = loops.add_parser("cir", parents=[roles], help="CIRR or FashionIQ through the CIR loop: Recall@K")
    cir_eval.add_argument("--index", type=Path, required=True, help="an index holding the benchmark's images")
    cir_eval.add_argument(
        "--annotations", type=Path, required=True, metavar="FILE",
        help="CIRR captions/cap.rc2.SPLIT.json, FashionIQ captions/cap.CATEGORY.SPLIT.json, or the dataset folder",
    )  # fmt: skip
    cir_eval.add_argument("--format", required=True, choices=["cirr", "fashioniq"], help="the benchmark")
    cir_eval.add_argument("--split", help="val (default), or test1 for CIRR's server files")
    cir_eval.add_argument(
        "--images", type=Path, metavar="DIR", help="the benchmark's images (default ROOT/img_raw or ROOT/images)"
    )
    cir_eval.add_argument("--concurrency", type=int, default=1, help=f"queries run at once {EACH}")
    cir_eval.add_argument("--out", type=Path, default=Path("runs/eval-cir"), help="results folder (resumable)")
    _add_knobs(cir_eval, CIRKnobs, "composed retrieval")
    _add_ray(cir_eval)
    cir_eval.add_argument("--json", action="store_true", help="print the recalls as JSON last")


def _add_triplets_parser(commands: Any, roles: argparse.ArgumentParser) -> None:
    triplets = commands.add_parser("triplets", parents=[roles], help="synthesise CIR training triplets as DAIG does")
    triplets.add_argument("--objects", type=Path, required=True, metavar="FILE", help="objects, one a line")
    triplets.add_argument(
        "--edits", required=True, metavar="LIST", help="edit types, comma-separated: add,delete,replace,viewpoint,count"
    )
    triplets.add_argument("--n", type=int, required=True, help="triplets the folder should hold")
    triplets.add_argument("--out", type=Path, required=True, metavar="DIR", help="dataset folder (triplets.jsonl)")
    triplets.add_argument("--examples", type=Path, metavar="FILE", help="real triplets (JSONL) as few-shot examples")
    triplets.add_argument("--lora", type=Path, metavar="PATH", help="a CIR-LoRA `train cir-lora` wrote (FLUX)")
    _add_knobs(triplets, TripletsKnobs, "synthesis")
    _add_ray(triplets)
    triplets.add_argument("--json", action="store_true", help='print {"written", "total", "out"} last')


def _add_train_parser(commands: Any, roles: argparse.ArgumentParser) -> None:
    from imageloop.training.options import CIRLoRAOptions, CIRTrainingOptions

    train = commands.add_parser("train", help="train DAIG's models: a composed-query model or a CIR-LoRA")
    models = train.add_subparsers(dest="training", required=True, metavar="MODEL")
    cir = models.add_parser(
        "cir", parents=[roles], help="a composed-query model (combiner, clip4cir, sprc): DRSP, then FRA"
    )
    cir.add_argument("--triplets", type=Path, required=True, metavar="DIR", help="synthetic triplets (pre-training)")
    cir.add_argument("--real", type=Path, metavar="FILE", help="real triplets (JSONL, e.g. cir-data's) to fine-tune on")
    _add_knobs(cir, CIRTrainingOptions, "training (the paper's values where it gives them)")
    cir_lora = models.add_parser("cir-lora", parents=[roles], help="an in-context LoRA on FLUX for diptychs")
    cir_lora.add_argument("--triplets", type=Path, required=True, metavar="DIR", help="real triplets (folder or JSONL)")
    _add_knobs(cir_lora, CIRLoRAOptions, "training (uncaptioned images are described by --captioner when given)")
    for parser in (cir, cir_lora):
        parser.add_argument(
            "--images", type=Path, metavar="DIR",
            help="a folder triplet images may lie in besides their file's own (cir-data's: the benchmark's images)",
        )  # fmt: skip
        parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the model goes (resumable)")
        parser.add_argument("--json", action="store_true", help="print the run's summary as JSON last")


def _add_cir_data_parser(commands: Any, roles: argparse.ArgumentParser) -> None:
    data = commands.add_parser(
        "cir-data", parents=[roles], help="a CIRR or FashionIQ train split as real triplets (K-shot, fraction, all)"
    )
    data.add_argument(
        "--annotations", type=Path, required=True, metavar="FILE",
        help="CIRR captions/cap.rc2.train.json, FashionIQ captions/cap.CATEGORY.train.json, or the dataset folder",
    )  # fmt: skip
    data.add_argument("--format", required=True, choices=["cirr", "fashioniq"], help="the benchmark")
    data.add_argument(
        "--images", type=Path, metavar="DIR", help="the benchmark's images (default ROOT/img_raw or ROOT/images)"
    )
    size = data.add_mutually_exclusive_group(required=True)
    size.add_argument("--shots", type=int, metavar="K", help="K triplets (DAIG's few-shot setting: 32)")
    size.add_argument("--fraction", type=float, metavar="F", help="this share of the split (DAIG: 0.01; 1: all)")
    data.add_argument("--seed", type=int, default=0, help="which sample (default 0; a smaller one nests in a larger)")
    data.add_argument("--out", type=Path, required=True, metavar="FILE", help="the triplets (JSONL) to write")
    data.add_argument("--json", action="store_true", help='print {"written", "out", "images"} last')


def _add_genir_eval_options(parser: argparse.ArgumentParser) -> None:
    """GenIR as published: benchmarks, several K from one run, the paper's simulated user and hybrid rules."""
    from imageloop.eval.genir_data import GENIR_BENCHMARKS

    data = parser.add_argument_group("benchmark (instead of --targets)")
    data.add_argument("--benchmark", choices=GENIR_BENCHMARKS, help="read the targets from the dataset's own files")
    data.add_argument("--images", type=Path, metavar="DIR", help="the benchmark's images folder")
    data.add_argument("--annotations", type=Path, metavar="FILE", help="its dialogues, captions or query list")
    data.add_argument("--sample", type=int, metavar="N", help="N targets drawn with GenIR's seed 42 (default all)")
    _add_knobs(parser, GenIREvalKnobs, "search and simulated user (the genir-paper preset sets the paper's values)")
    _add_ray(parser)
    parser.add_argument(
        "--rescore-text", action="store_true", help="re-score the queries saved in --out by text-only retrieval"
    )


def _add_eval_imagerag_parser(loops: Any, roles: argparse.ArgumentParser) -> None:
    """`imageloop eval imagerag`: draft vs final image of every prompt, on CLIP, SigLIP, DINO and a VLM judge."""
    from imageloop.eval.imagerag import METRICS

    parser = loops.add_parser("imagerag", parents=[roles], help="ImageRAG: draft vs final on CLIP, SigLIP, DINO, judge")
    parser.add_argument(
        "--prompts", type=Path, required=True, metavar="FILE_OR_CLASS_FOLDER",
        help='a file of prompts (CLASS<TAB>PROMPT names a class) or a folder of classes ("a photo of a <class>")',
    )  # fmt: skip
    parser.add_argument("--index", type=Path, required=True, help="the indexed image folder ImageRAG retrieves from")
    parser.add_argument("--out", type=Path, required=True, help="results folder (resumable)")
    parser.add_argument("--real-images", type=Path, metavar="DIR", help="a folder per class of real images (DINO)")
    parser.add_argument("--metrics", metavar="NAME[,NAME]", help=f"some of {','.join(METRICS)} (default all)")
    parser.add_argument("--concurrency", type=int, default=1, help=f"prompts run at once {EACH}")
    parser.add_argument("--json", action="store_true", help='print {"n", "metrics": {NAME: {"draft", "final"}}} last')
    models = parser.add_argument_group("scoring models")
    models.add_argument("--eval-clip", metavar="PROVIDER:MODEL", help="CLIP (open_clip:ViT-L-14/openai)")
    models.add_argument(
        "--eval-siglip", metavar="PROVIDER:MODEL", help="SigLIP (open_clip:ViT-SO400M-14-SigLIP-384/webli)"
    )
    models.add_argument("--eval-dino", metavar="transformers:MODEL", help="DINO (transformers:facebook/dinov2-base)")
    models.add_argument("--judge", metavar="PROVIDER:MODEL", help="the VLM judge (default: the --vlm)")
    _add_knobs(parser, ImageRAGKnobs, "ImageRAG loop (the imagerag-paper preset sets the paper's values)")
    _add_ray(parser)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for docs and tests)."""
    roles = _role_options()
    parser = argparse.ArgumentParser(
        prog="imageloop",
        description="Retrieval-augmented image generation and generative image retrieval as LangGraph loops.",
    )
    parser.add_argument("--version", action="version", version=f"imageloop {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    index = commands.add_parser("index", parents=[roles], help="index a folder of images for retrieval")
    index.add_argument(
        "folder", type=Path, nargs="+", metavar="SOURCE",
        help="a folder of images, a parquet table of image paths and captions, or WebDataset shards "
        "('data/{00000..00099}.tar'); the index is written to FOLDER/.imageloop (the folder holding them)",
    )  # fmt: skip
    _add_knobs(index, IndexOptions, "indexing")
    index.add_argument("--json", action="store_true", help='print {"indexed", "skipped", "failed", "total", ...} last')
    stores = index.add_argument_group("vector store (a new index; an existing one keeps its own)")
    stores.add_argument("--store", choices=STORE_KINDS, help="default embedded: FOLDER/.imageloop")
    stores.add_argument("--weaviate-url", metavar="URL", help="e.g. http://localhost:8080 or https://ID.weaviate.cloud")
    stores.add_argument("--weaviate-api-key", metavar="KEY", help="default: WEAVIATE_API_KEY (never written to disk)")
    _add_ray(index)

    index_info = commands.add_parser("index-info", help="show what an index holds and what built it")
    index_info.add_argument("index", type=Path, metavar="INDEX", help="an indexed image folder (or its .imageloop)")
    index_info.add_argument("--json", action="store_true", help='print {"count", "embedder", "dim", "store"}')

    query = commands.add_parser(
        "query", parents=[_role_options(["embedder"])], help="retrieve the indexed images that match a text or image"
    )
    query.add_argument("index", type=Path, metavar="INDEX", help="an indexed image folder")
    query.add_argument("text", nargs="?", help="what the images show (or pass --image)")
    query.add_argument("--image", type=Path, help="find images that look like this one")
    query.add_argument("--k", type=int, help=f"how many results (default {_default('k')})")
    query.add_argument("--similarity-threshold", type=float, help="drop results below this cosine")
    query.add_argument(
        "--where", action="append", default=[], metavar="KEY=VALUE", help="metadata filter, e.g. folder=birds"
    )
    query.add_argument(
        "--json", action="store_true", help='print {"results": [{"id", "path", "caption", "score"}]} last'
    )

    generate = commands.add_parser("generate", parents=[roles], help="run ImageRAG for a prompt")
    generate.add_argument("prompt", nargs="?", help="what to draw (not needed with --resume)")
    generate.add_argument("--index", type=Path, help="an indexed image folder")
    generate.add_argument("--out", type=Path, help="run directory for images and run.json")
    generate.add_argument(
        "--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run from its checkpoint"
    )
    _add_knobs(generate, ImageRAGKnobs, "ImageRAG loop (the imagerag-paper preset sets the paper's values)")
    generate.add_argument(
        "--where", action="append", default=[], metavar="KEY=VALUE", help="retrieve only matching images"
    )
    generate.add_argument("--json", action="store_true", help="print run.json to stdout when done")

    search = commands.add_parser("search", parents=[roles], help="find an image you have in mind, round by round")
    _add_knobs(search, GenIRKnobs, "search")
    search.add_argument("--index", type=Path, help="an indexed image folder (not needed with --resume)")
    search.add_argument("--query", help="what you are looking for (asked for when missing)")
    search.add_argument("--resume", metavar="SESSION_ID", help="continue a session (started in any face)")
    search.add_argument("--out", type=Path, help="where round images and pages go (default runs/search-ID)")
    search.add_argument(
        "--sessions", type=Path, help="session database (default $IMAGELOOP_SESSIONS or ~/.local/state)"
    )
    search.add_argument(
        "--json", action="store_true", help="print the session as it ended last (rounds and questions go to stderr)"
    )

    evaluate = commands.add_parser("eval", help="benchmark a loop")
    loops = evaluate.add_subparsers(dest="loop", required=True, metavar="LOOP")
    genir_eval = loops.add_parser("genir", parents=[roles], help="simulated-user GenIR: cumulative Hits@K per round")
    genir_eval.add_argument("--index", type=Path, help="an indexed image folder (the corpus searched)")
    genir_eval.add_argument("--targets", type=Path, help="a folder of target images or a file of paths")
    genir_eval.add_argument("--concurrency", type=int, default=1, help=f"targets searched at once {EACH}")
    genir_eval.add_argument("--out", type=Path, default=Path("runs/eval-genir"), help="results folder (resumable)")
    genir_eval.add_argument("--json", action="store_true", help='print {"rounds": [{"round", "hits_at_k"}], ...} last')
    _add_cir_eval_parser(loops, roles)

    _add_cir_parser(commands, roles)
    _add_triplets_parser(commands, roles)
    _add_train_parser(commands, roles)
    _add_cir_data_parser(commands, roles)
    _add_genir_eval_options(genir_eval)
    _add_eval_imagerag_parser(loops, roles)

    _add_rage_parser(commands, roles)

    report = commands.add_parser("report", help="(re)write a run directory's report.html from its run.json")
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a directory `imageloop generate --out` wrote")

    mcp = commands.add_parser("mcp", parents=[roles], help="serve the tools to MCP clients (stdio; HTTP with --http)")
    mcp.add_argument(
        "--root", type=Path, action="append", default=[], metavar="DIR",
        help="a folder that path arguments may reach (repeatable; default: the current directory)",
    )  # fmt: skip
    mcp.add_argument("--runs", type=Path, metavar="DIR", help="runs (default FIRST_ROOT/.imageloop-runs)")
    mcp.add_argument("--sessions", type=Path, help="GenIR session database (default shared with the other faces)")
    mcp.add_argument("--http", metavar="HOST:PORT", help="serve streamable HTTP at HOST:PORT/mcp instead of stdio")
    mcp.add_argument("--token", help="bearer token HTTP clients must send beyond localhost ($IMAGELOOP_MCP_TOKEN)")
    mcp.add_argument(
        "--allow-host", action="append", default=[], metavar="NAME",
        help="a host name HTTP clients may use besides localhost and the bound address (repeatable)",
    )  # fmt: skip
    mcp.add_argument(
        "--allow-origin", action="append", default=[], metavar="ORIGIN",
        help="a web origin (https://app.example.com) whose pages may call the HTTP server besides its own (repeatable)",
    )  # fmt: skip
    _add_ui_parser(commands, roles)
    _add_completion_parser(commands)
    _add_quiet(parser)
    _add_roots(parser)
    return parser


def _add_quiet(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """`-q/--quiet` before or after the command (a subcommand's flag must not reset the top level's)."""
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=False if top else argparse.SUPPRESS,
        help="no progress output (steps, bars); results, errors and --json output still print",
    )  # fmt: skip
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                _add_quiet(sub, top=False)


def _add_roots(parser: argparse.ArgumentParser) -> None:
    """`--root DIR` on every command that reads paths (`mcp` has its own): opt-in confinement, as the servers do."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in dict.fromkeys(action.choices.items()):
                if any(isinstance(inner, argparse._SubParsersAction) for inner in sub._actions):
                    _add_roots(sub)
                elif name != "completion" and "--root" not in sub._option_string_actions:
                    sub.add_argument(
                        "--root", type=Path, action="append", default=[], metavar="DIR",
                        help="confine every path argument to DIR (repeatable; relative paths are taken from the "
                        "first; symlinks resolved, '..' refused); default: unconfined",
                    )  # fmt: skip


def _add_ui_parser(commands: Any, roles: argparse.ArgumentParser) -> None:
    ui = commands.add_parser("ui", parents=[roles], help="open the browser UI (generate, search, pick, compose)")
    ui.add_argument("--index", type=Path, required=True, help="the indexed image folder the UI searches")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    ui.add_argument(
        "--token", help="access token required beyond localhost ($IMAGELOOP_UI_TOKEN; default: a random one)"
    )
    ui.add_argument(
        "--root", type=Path, action="append", default=[], metavar="DIR",
        help="a folder the UI may read besides --index (repeatable); nothing else is read",
    )  # fmt: skip
    ui.add_argument("--runs", type=Path, metavar="DIR", help="where runs and searches are written (default runs/)")
    ui.add_argument("--sessions", type=Path, help="GenIR session database (default shared with the other faces)")


def _add_completion_parser(commands: Any) -> None:
    completion = commands.add_parser("completion", help="print a shell completion script (bash or zsh)")
    completion.add_argument("shell", choices=["bash", "zsh"], help='e.g. eval "$(imageloop completion bash)"')


def _add_rage_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], roles: argparse.ArgumentParser
) -> None:
    rage = commands.add_parser(
        "rage", parents=[roles], help="retrieve from your catalogue, pick images, generate with them (RAGE)"
    )
    rage.add_argument("prompt", nargs="?", help="what to generate; also what to retrieve (not needed with --resume)")
    rage.add_argument("--index", type=Path, help="an indexed image folder (your catalogue)")
    rage.add_argument("--out", type=Path, help="run directory for final.png, run.json and report.html")
    rage.add_argument(
        "--where", action="append", default=[], metavar="KEY=VALUE", help="metadata filter, e.g. tags=sneaker"
    )
    rage.add_argument(
        "--select", metavar="ITEMS", help="picks, comma-separated: positions as shown (1,3), ids or file names"
    )
    _add_knobs(rage, RAGEKnobs, "RAGE", auto_select="--auto")
    rage.add_argument("--resume", metavar="SESSION_ID", help="continue a RAGE session (started in any face)")
    rage.add_argument("--sessions", type=Path, help="session database (default $IMAGELOOP_SESSIONS or ~/.local/state)")
    rage.add_argument("--json", action="store_true", help='print {"final_image", "selected", "stop_reason"} last')


def _settings(args: argparse.Namespace) -> Settings:
    """The process's settings: the models and stores this command line names (its knobs go to the run itself)."""
    overrides = {name: getattr(args, name) for name in ModelSettings.model_fields if hasattr(args, name)}
    return load_settings(getattr(args, "profile", None), overrides)


def _app(args: argparse.Namespace, **options: Any) -> App:
    from imageloop.app import App

    options.setdefault("roots", getattr(args, "root", None) or None)
    return App(_settings(args), sessions_db=getattr(args, "sessions", None), **options)


def _err(message: str) -> None:
    # One write, its newline included: print's two writes let another thread's line (Ray forwards its workers'
    # logs to this stderr from a thread of its own) land between a message and its newline.
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()


class _Progress:
    """Steps and in-node progress (denoising) on stderr: a bar at a terminal, one line per finished task in a
    log; nothing with --quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Any = None

    def followers(self) -> Followers:
        """The callbacks a loop run takes to be followed: each step, and progress inside one."""
        followers: Followers = {"on_step": self.step, "on_progress": self.progress}
        return followers

    def step(self, step: Step) -> None:
        """A node finished: say what it decided."""
        if not self.quiet:
            self._close_bar()
            _err(f"[{step['node']}] {step['decision']} ({step['seconds']:.2f} s)")

    def progress(self, event: ProgressEvent) -> None:
        """How far a long call inside a node got."""
        if self.quiet:
            return
        if not sys.stderr.isatty():
            if event["total"] is not None and event["done"] >= event["total"]:
                _err(describe(event))
            return
        from tqdm import tqdm

        if self.bar is None or event["done"] <= self.bar.n:
            self._close_bar()
            desc = f"[{event['node']}] {event['what']}" if event["node"] else event["what"]
            self.bar = tqdm(total=event["total"], desc=desc, leave=False, file=sys.stderr)
        self.bar.update(event["done"] - self.bar.n)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _index(args: argparse.Namespace, app: App) -> int:
    summary = app.index_folder(
        args.folder, options=_given(args, IndexOptions), progress=not args.quiet, ray=_given(args, RayOptions)
    )
    for path, reason in summary.failures:
        _err(f"skipped {path}: {reason}")
    removed = f", removed {summary.removed}" if summary.removed else ""
    _err(f"indexed {summary.indexed}, skipped {summary.skipped}, failed {summary.failed} of {summary.total}{removed}")
    if args.json:
        print(json.dumps(summary.to_json()))
    return 0


def _index_info(args: argparse.Namespace, app: App) -> int:
    info = app.index_info(args.index)
    if args.json:
        print(json.dumps(info))
    else:
        print(f"{info['root']}: {info['count']} images")
        print(f"  embedder: {info['embedder']} ({info['dim']}-d, {info['route']} route)")
        print(f"  store:    {app.index(args.index).location.describe()}")
    return 0


def _query(args: argparse.Namespace, app: App) -> int:
    from imageloop.app import parse_where

    if (args.text is None) == (args.image is None):
        raise ConfigError("give a TEXT to search for, or --image IMAGE (not both)")
    found = app.retrieve(
        args.index, query=args.text, image=args.image, k=args.k,
        similarity_threshold=args.similarity_threshold, where=parse_where(args.where),
    )  # fmt: skip
    results: list[dict[str, Any]] = [
        {"id": r.id, "path": str(r.path), "caption": r.caption, "score": round(r.score, 6)} for r in found
    ]
    for position, r in enumerate(results, start=1):
        _err(f"{position}. {r['path']}  ({r['score']:.3f})  {r['caption'][:80]}")
    if not results:
        _err("no indexed image matched")
    if args.json:
        print(json.dumps({"results": results}))
    return 0


def _generate(args: argparse.Namespace, app: App) -> int:
    from imageloop.app import parse_where

    if args.resume is None and (args.prompt is None or args.index is None or args.out is None):
        raise ConfigError("generate needs PROMPT, --index and --out (or --resume RUN_DIR)")
    knobs = _given(args, ImageRAGKnobs)
    shown = _Progress(args.quiet)
    record = app.generate(
        args.prompt, args.index, out_dir=args.resume or args.out, knobs=knobs,
        where=parse_where(args.where), on_step=shown.step, on_progress=shown.progress, resume=args.resume is not None,
    )  # fmt: skip
    _err(f"{record['stop_reason']}: final image {record['final_image']}; record {args.resume or args.out}/run.json")
    if args.json:
        print(json.dumps(record))
    return 0


def _search(args: argparse.Namespace, app: App) -> int:
    given = _given(args, GenIRKnobs)
    progress = _Progress(args.quiet)
    follow = progress.followers()
    say: Callable[[str], None] = _err if args.json else print  # with --json, stdout holds the result alone
    if args.resume is not None:
        shown = app.show_search(args.resume, knobs=given)
        if shown.status == "incomplete":
            shown = app.continue_search(args.resume, None, **follow)
    else:
        if args.index is None:
            raise ConfigError("search needs --index (or --resume SESSION_ID)")
        query = args.query or _ask("What are you looking for? ")
        shown = app.start_search(args.index, query, knobs=given, out_dir=args.out, **follow)
        args.session_id = shown.session_id  # what a Ctrl-C from here on may point back to
        say(f"session {shown.session_id} (continue it with --resume {shown.session_id})")
    while shown.status == "awaiting_feedback":
        _print_round(shown, say)
        answer = _ask(f"{shown.ask}\n> ") if args.json else input(f"{shown.ask}\n> ")
        try:
            shown = app.continue_search(shown.session_id, answer, **follow)
        except ImageloopError as e:  # an empty or unknown answer: say why and ask again
            say(f"  {e}")
    found = shown.found_id or "not found"
    say(f"{shown.stop_reason}: {found} after {shown.rounds_played} round(s)")
    if args.json:
        print(json.dumps(shown.model_dump(mode="json")))
    return 0


def _print_round(shown: SearchView, say: Callable[[str], None]) -> None:
    say(f"\nround {shown.round}: {shown.query}")
    if shown.synthetic_image:
        say(f"  synthetic image: {shown.synthetic_image}")
    for r in shown.retrieved:
        say(f"  {r.position}. {r.path}  ({r.score:.3f})  id {r.id[:12]}")
    say(f"  page: {shown.page}")


def _rage(args: argparse.Namespace, app: App) -> int:
    from imageloop.app import parse_where

    progress = _Progress(args.quiet)
    follow = progress.followers()
    knobs = _given(args, RAGEKnobs)
    if args.select is not None and knobs.get("auto_select"):
        raise ConfigError("--select and --auto both pick: give one")
    if args.resume is not None:
        given = [f"--{name}" for name in ("index", "out", "prompt") if getattr(args, name) is not None]
        if given or args.where:
            raise ConfigError(f"--resume continues a session as it was started: drop {', '.join(given or ['--where'])}")
        shown = app.continue_rage(args.resume, None, knobs=knobs, **follow)
    else:
        if args.prompt is None or args.index is None or args.out is None:
            raise ConfigError("rage needs PROMPT, --index and --out (or --resume SESSION_ID)")
        shown = app.start_rage(
            args.prompt, args.index, knobs=knobs, where=parse_where(args.where), out_dir=args.out, **follow
        )
        _err(f"session {shown.session_id} (continue it with: imageloop rage --resume {shown.session_id})")
    scripted = args.select
    while shown.question is not None:
        _show_question(shown)
        if scripted is not None:  # --select answers the first question; a later one is asked
            answer: Any = {"selected": scripted}
            scripted = None
            shown = app.continue_rage(shown.session_id, answer, **follow)
            continue
        answer = _ask_selection() if shown.status == "awaiting_selection" else _ask_review()
        try:
            shown = app.continue_rage(shown.session_id, answer, **follow)
        except ImageloopError as e:  # a pick or an answer that names nothing: say why and ask again
            _err(f"  {e}")
    _err(f"{shown.stop_reason}: {shown.final_image or 'no image'}; report {shown.report}")
    if args.json:
        selected = [{"id": c.id, "path": c.path} for c in shown.selected]
        print(json.dumps({"final_image": shown.final_image, "selected": selected, "stop_reason": shown.stop_reason}))
    return 0


def _show_question(shown: RAGEView) -> None:
    question = shown.question or {}
    if question["kind"] == "select":
        _err(f"\ncandidates for: {question['prompt']}")
        for c in shown.candidates:
            _err(f"  {c.position}. {c.path}  ({c.score:.3f})  id {c.id[:12]}  {c.caption[:60]}")
        if not shown.candidates:
            _err("  nothing matched")
        _err(f"  thumbnails: {shown.report}\n{question['ask']}")
    else:
        _err(f"\ngeneration {question['generation']}: {question['image']}  (page: {shown.report})")
        _err(f"{question['ask']} ({question['generations_left']} more allowed)")


def _ask(question: str) -> str:
    """A line read after `question` on stderr, so `--json` keeps stdout for the result."""
    print(question, end="", file=sys.stderr, flush=True)
    return input().strip()


def _ask_selection() -> dict[str, Any]:
    picks = _ask("picks> ")
    if picks:
        return {"selected": picks}
    return {"selected": [], "prompt": _ask("nothing picked; a new prompt to search again (empty to stop)> ") or None}


def _ask_review() -> dict[str, Any]:
    action = _ask("accept, regenerate or reselect> ") or "accept"
    if action.lower() != "regenerate":
        return {"action": action}
    return {"action": action, "prompt": _ask("a new prompt (empty keeps it)> ") or None}


@contextmanager
def _counter(things: str, unit: str, quiet: bool) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr (none with --quiet), fed `(done, total)`."""
    from tqdm import tqdm

    bar = tqdm(desc=things, unit=unit, file=sys.stderr, disable=True if quiet else None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield progress
    finally:
        bar.close()


def _eval(args: argparse.Namespace, app: App) -> int:
    if args.loop == "imagerag":
        return _eval_imagerag(args, app)
    if args.loop == "cir":
        return _eval_cir(args, app)
    if args.rescore_text:
        summary = app.rescore_genir(args.out, args.index, ray=_given(args, RayOptions))
        _show_hits(summary)
        where = args.out / "text_rescore.json"
        _err(f"{summary['n_targets']} dialogues re-scored by text with {summary['embedder']}; summary in {where}")
    else:
        if args.index is None:
            raise ConfigError("eval genir needs --index (the indexed corpus to search)")
        knobs = _given(args, GenIREvalKnobs)
        with _counter("targets", "target", args.quiet) as progress:
            summary = app.eval_genir(
                args.index, args.targets, args.out, benchmark=args.benchmark, images=args.images,
                annotations=args.annotations, sample=args.sample, knobs=knobs, concurrency=args.concurrency,
                ray=_given(args, RayOptions), on_target=progress,
            )  # fmt: skip
        _show_hits(summary)
        _err(f"{summary['n_targets']} targets; dialogues in {args.out / 'dialogues.jsonl'}")
    if args.json:
        keys = ("rounds", "k", "ks", "n_targets", "mean_rank", "hybrid", "route")
        print(json.dumps({key: summary[key] for key in keys if key in summary}))
    return 0


def _show_hits(summary: dict[str, Any]) -> None:
    for entry in summary["rounds"]:
        hits = ", ".join(f"Hits@{k} = {value:.3f}" for k, value in entry["hits_at"].items())
        latency = f" ({entry['latency_s']:.2f} s)" if entry.get("latency_s") is not None else ""
        carried = f"; {entry['carried']} of {summary['n_targets']} carried forward" if entry.get("carried") else ""
        _err(f"round {entry['round']}: {hits}{latency}{carried}")


def _eval_imagerag(args: argparse.Namespace, app: App) -> int:
    knobs = _given(args, ImageRAGKnobs)
    with _counter("prompts", "prompt", args.quiet) as progress:
        summary = app.eval_imagerag(
            args.prompts, args.index, args.out, real_images=args.real_images, metrics=args.metrics, knobs=knobs,
            concurrency=args.concurrency, ray=_given(args, RayOptions), on_prompt=progress,
        )  # fmt: skip
    for name, row in summary["metrics"].items():
        draft, final = row["draft"]["mean"], row["final"]["mean"]
        shown = " -> ".join("-" if value is None else f"{value:.4f}" for value in (draft, final))
        _err(f"{name}: draft -> final {shown}")
    _err(f"{summary['n']} prompts; results in {args.out / 'results.jsonl'}, report {args.out / 'report.html'}")
    if args.json:
        means = {
            name: {which: row[which]["mean"] for which in ("draft", "final")}
            for name, row in summary["metrics"].items()
        }
        print(json.dumps({"n": summary["n"], "metrics": means}))
    return 0


def _report(args: argparse.Namespace, app: App) -> int:
    from imageloop.report import write_report

    print(write_report(app.path(args.run_dir, "run", kind="dir")))
    return 0


def _mcp(args: argparse.Namespace, app: App) -> int:
    import importlib.util
    import os

    if importlib.util.find_spec("mcp") is None:
        raise ConfigError("the MCP server needs the mcp extra: pip install 'imageloop[mcp]'")
    from imageloop.mcp import serve

    token = args.token or os.environ.get("IMAGELOOP_MCP_TOKEN") or None
    serve(app, http=args.http, token=token, allow_hosts=args.allow_host, allow_origins=args.allow_origin)
    return 0


def _ui(args: argparse.Namespace, app: App) -> int:
    import importlib.util
    import os

    if importlib.util.find_spec("streamlit") is None:
        raise ConfigError("the browser UI needs the ui extra: pip install 'imageloop[ui]'")
    from imageloop.ui import serve

    token = args.token or os.environ.get("IMAGELOOP_UI_TOKEN") or None
    serve(app, index=args.index.resolve(), host=args.host, port=args.port, token=token)
    return 0


def _ui_app(args: argparse.Namespace) -> App:
    from imageloop.app import App

    return App.serving(_settings(args), args.index, args.root, runs_dir=args.runs, sessions_db=args.sessions)


def _completion(args: argparse.Namespace, app: App) -> int:
    from imageloop.completion import completion_script

    print(completion_script(build_parser(), args.shell))
    return 0


def _mcp_app(args: argparse.Namespace) -> App:
    roots = args.root or [Path.cwd()]
    if not args.root and Path.cwd() == Path(Path.cwd().anchor):
        raise ConfigError("the current directory is the filesystem root: pass --root DIR for the folders to serve")
    runs = args.runs or Path(roots[0]).resolve() / ".imageloop-runs"
    return _app(args, roots=roots, runs_dir=runs)


def _cir(args: argparse.Namespace, app: App) -> int:
    found = app.compose_retrieve(
        args.index, args.reference, args.change, knobs=_given(args, CIRKnobs), on_step=_Progress(args.quiet).step
    )
    if found.edited_description:
        _err(f"edited description: {found.edited_description}")
    for r in found.results:
        _err(f"{r.position}. {r.path}  ({r.score:.3f})")
    if not found.results:
        _err("no indexed image matched")
    if args.json:
        results = [r.model_dump() for r in found.results]
        print(json.dumps({"edited_description": found.edited_description, "results": results}))
    return 0


def _eval_cir(args: argparse.Namespace, app: App) -> int:
    with _counter("queries", "query", args.quiet) as progress:
        summary = app.eval_cir(
            args.index, args.annotations, args.format, args.out, split=args.split, images=args.images,
            knobs=_given(args, CIRKnobs), concurrency=args.concurrency, ray=_given(args, RayOptions),
            on_query=progress,
        )  # fmt: skip
    keys: tuple[str, ...]
    if "submission" in summary:
        keys = ("n", "submission")
        _err(f"{summary['n']} queries; CIRR server files: {', '.join(summary['submission'].values())}")
    elif args.format == "cirr":
        keys = ("n", "recall_at", "recall_subset_at", "avg")
        recalls = ", ".join(f"R@{k} {v:.2f}" for k, v in summary["recall_at"].items())
        subset = ", ".join(f"Rs@{k} {v:.2f}" for k, v in summary["recall_subset_at"].items())
        _err(f"{summary['n']} queries: {recalls}; {subset}; Avg {summary['avg']:.2f}")
    else:
        keys = ("n", "categories", "avg_at_10")
        for name, c in summary["categories"].items():
            _err(f"{name}: R@10 {c['recall_at_10']:.2f}, R@50 {c['recall_at_50']:.2f}")
        _err(f"{summary['n']} queries: average R@10 {summary['avg_at_10']:.2f}, R@50 {summary['avg_at_50']:.2f}")
    _err(f"per-query records in {args.out / 'queries.jsonl'}")
    if args.json:
        print(json.dumps({key: summary[key] for key in keys}))
    return 0


def _triplets(args: argparse.Namespace, app: App) -> int:
    progress = _Progress(args.quiet)

    def show(step: Step) -> None:
        if step["node"] in ("synthesize", "finish", "prepare"):
            progress.step(step)

    made = app.synthesize_triplets(
        args.objects, args.edits, args.n, args.out, examples=args.examples, lora=args.lora,
        knobs=_given(args, TripletsKnobs), ray=_given(args, RayOptions), on_step=show,
    )  # fmt: skip
    counts = f"wrote {made['written']} (failed {made['failed']}, rejected {made['rejected']})"
    _err(f"{counts}; {made['total']} triplets in {made['out']}")
    if args.json:
        print(json.dumps({key: made[key] for key in ("written", "total", "out")}))
    return 0


def _train(args: argparse.Namespace, app: App) -> int:
    from tqdm import tqdm

    from imageloop.training.options import CIRLoRAOptions, CIRTrainingOptions

    bar = tqdm(desc=f"train {args.training}", unit="step", file=sys.stderr, disable=None)

    def progress(event: Any) -> None:
        bar.total = event.total_steps
        bar.n = event.step
        bar.set_postfix(stage=event.stage, loss=f"{event.loss:.4f}", refresh=False)
        bar.refresh()

    try:
        if args.training == "cir":
            options = _given(args, CIRTrainingOptions)
            summary = app.train_cir(
                args.triplets, args.out, real=args.real, images=args.images, options=options, progress=progress
            )
        else:
            summary = app.train_cir_lora(
                args.triplets, args.out, images=args.images, options=_given(args, CIRLoRAOptions), progress=progress
            )
    finally:
        bar.close()
    _err(f"{summary['steps']} steps, final loss {summary['final_loss']:.4f}; loss curve {summary['loss_curve_svg']}")
    if args.json:
        print(json.dumps(summary))
    return 0


def _cir_data(args: argparse.Namespace, app: App) -> int:
    made = app.cir_data(
        args.annotations, args.format, args.out, images=args.images, shots=args.shots, fraction=args.fraction,
        seed=args.seed,
    )  # fmt: skip
    captions = ", with captions" if made["captioned"] else ""
    _err(f"wrote {made['written']} of the split's {made['split_size']} triplets to {made['out']}{captions}")
    _err(f"their images lie in {made['images']}: train on them with --real {made['out']} --images {made['images']}")
    if args.json:
        print(json.dumps({"written": made["written"], "out": made["out"], "images": made["images"]}))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, App], int]] = {
    "index": _index,
    "index-info": _index_info,
    "query": _query,
    "generate": _generate,
    "search": _search,
    "rage": _rage,
    "eval": _eval,
    "report": _report,
    "cir": _cir,
    "triplets": _triplets,
    "train": _train,
    "cir-data": _cir_data,
    "mcp": _mcp,
    "ui": _ui,
    "completion": _completion,
}
APPS: dict[str, Callable[[argparse.Namespace], App]] = {"mcp": _mcp_app, "ui": _ui_app}


def _interrupted(args: argparse.Namespace, error: BaseException) -> str:
    """What Ctrl-C kept, and the command that continues from there: only what is true at that moment."""
    from imageloop.app.runs import can_resume
    from imageloop.tools.indexing.indexer import IndexingInterrupted

    if args.command == "index":
        if isinstance(error, IndexingInterrupted):
            return f"{error}; run the same command again to add the rest"
        return "stopped before indexing began; nothing was changed"
    if args.command == "generate":
        run_dir = args.resume or args.out
        if run_dir is not None and can_resume(run_dir):
            return f"the run so far is in {run_dir}/run.json; continue it with: imageloop generate --resume {run_dir}"
        return "stopped before the run began; nothing was saved: run the same command again"
    if args.command == "search":
        session = getattr(args, "session_id", None) or args.resume
        if session:
            return f"search paused; continue it with: imageloop search --resume {session}"
        return "stopped before the search showed its first round: run the same command again"
    if args.command == "rage":
        return "the session is kept; continue it with: imageloop rage --resume SESSION_ID (printed above)"
    if args.command == "eval":
        return f"finished targets are in {args.out}; run the same command again to evaluate the rest"
    if args.command == "triplets":
        return f"finished triplets are in {args.out}; run the same command again to make the rest"
    if args.command == "train":
        return f"checkpoints are in {args.out}; run the same command again to resume"
    if args.command == "cir-data":
        return f"nothing was written to {args.out}; captions made so far are kept: run the same command again"
    return "stopped"


def _as_options(message: str) -> str:
    """An application error in this face's spelling: a setting or knob named `like_this` is `--like-this`."""
    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: "--" + str(m[1]).replace("_", "-"), message)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `imageloop` script."""
    args = build_parser().parse_args(argv)
    if args.quiet:
        hide_loading_bars()
    from imageloop.app.jobs import LeftRunning

    app: App | None = None
    try:
        with _sigterm_as_interrupt(args.command):
            try:
                app = APPS.get(args.command, _app)(args)
                code = COMMANDS[args.command](args, app)
                sys.stdout.flush()  # here, so a reader that went away (`| head`) is noticed below, not at exit
                return code
            finally:
                if app is not None:
                    app.close()
    except BrokenPipeError:
        # Whoever read stdout stopped (`imageloop completion bash | head`): as any Unix filter, stop quietly,
        # sending what is still buffered nowhere so that the interpreter's own flush at exit cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except ImageloopError as e:
        _err(f"imageloop: error: {_as_options(str(e))}")
        return EXIT_USER_ERROR
    except (KeyboardInterrupt, EOFError) as e:
        stop = e.stop if isinstance(e, LeftRunning) else e
        _err(f"\nimageloop: {'terminated' if isinstance(stop, Terminated) else 'interrupted'}; {_interrupted(args, e)}")
        code = EXIT_TERMINATED if isinstance(stop, Terminated) else EXIT_INTERRUPTED
        if isinstance(e, LeftRunning):
            sys.stderr.flush()
            os._exit(code)  # not waiting for a model call that may hang for minutes: the record says where it stopped
        return code


if __name__ == "__main__":
    sys.exit(main())
