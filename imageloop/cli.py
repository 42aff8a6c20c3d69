"""The `imageloop` command line.

User errors print one line (`imageloop: error: ...`) and exit 2; Ctrl-C exits 130 after saying what
was kept. Progress goes to stderr so `--json` output on stdout stays machine-readable.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imageloop import __version__
from imageloop.config import Settings, load_settings
from imageloop.errors import ConfigError, ImageloopError

EXIT_USER_ERROR = 2
FEEDBACK_CHOICES = ["visual", "verbal", "prediction", "hybrid"]
EXIT_INTERRUPTED = 130


def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or int(width) < 8 or int(height) < 8:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 1024x1024, got {text!r}")
    return int(width), int(height)


def _role_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("models (PROVIDER:MODEL; see README for providers)")
    group.add_argument("--profile", help="defaults for every role: openai, local or tiny")
    for role, example in [
        ("vlm", "openai:gpt-4.1-mini"),
        ("generator", "openai:gpt-image-1"),
        ("embedder", "openai:text-embedding-3-small"),
        ("captioner", "openai:gpt-4.1-mini (default: the --vlm)"),
    ]:
        group.add_argument(f"--{role}", metavar="PROVIDER:MODEL", help=f"e.g. {example}")
        group.add_argument(f"--{role}-base-url", metavar="URL", help=f"OpenAI-compatible endpoint for the {role}")
    group.add_argument("--device", help="local models: cuda, cuda:1, mps or cpu (default: best available)")
    group.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="local models (default per device)")
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
    return parent


def _drawing_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("drawing")
    group.add_argument("--seed", type=int, help="generator seed (default 0)")
    group.add_argument("--size", type=_size, help="WIDTHxHEIGHT, e.g. 1024x1024 (default per backend)")
    group.add_argument("--steps", type=int, help="denoising steps for diffusion backends (default per backend)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for docs and tests)."""
    roles = _role_options()
    drawing = _drawing_options()
    parser = argparse.ArgumentParser(
        prog="imageloop",
        description="Retrieval-augmented image generation and generative image retrieval as LangGraph loops.",
    )
    parser.add_argument("--version", action="version", version=f"imageloop {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    index = commands.add_parser("index", parents=[roles], help="index a folder of images for retrieval")
    index.add_argument("folder", type=Path, help="folder of images; the index is written to FOLDER/.imageloop")
    index.add_argument("--batch-size", type=int, default=32, help="images embedded per batch (default 32)")
    index.add_argument("--json", action="store_true", help='print {"indexed", "skipped", "failed", "total"} last')
    stores = index.add_argument_group("vector store (a new index; an existing one keeps its own)")
    stores.add_argument("--store", choices=["embedded", "weaviate"], help="default embedded: FOLDER/.imageloop")
    stores.add_argument("--weaviate-url", metavar="URL", help="e.g. http://localhost:8080 or https://ID.weaviate.cloud")
    stores.add_argument("--weaviate-api-key", metavar="KEY", help="default: WEAVIATE_API_KEY (never written to disk)")

    index_info = commands.add_parser("index-info", help="show what an index holds and what built it")
    index_info.add_argument("index", type=Path, metavar="INDEX", help="an indexed image folder (or its .imageloop)")
    index_info.add_argument("--json", action="store_true", help='print {"count", "embedder", "dim", "store"}')

    generate = commands.add_parser("generate", parents=[roles, drawing], help="run ImageRAG for a prompt")
    generate.add_argument("prompt")
    generate.add_argument("--index", type=Path, required=True, help="an indexed image folder")
    generate.add_argument("--out", type=Path, required=True, help="run directory for images and run.json")
    generate.add_argument("--mode", choices=["draft_first", "generation"], help="default draft_first")
    generate.add_argument("--max-iterations", type=int, help="regenerations with references (default 1)")
    generate.add_argument("--similarity-threshold", type=float, help="drop references below this cosine")
    generate.add_argument("--top-k", type=int, help="references retrieved per missing concept (default 1)")
    generate.add_argument("--max-concepts", type=int, help="missing concepts per critique (default 3)")
    generate.add_argument("--json", action="store_true", help="print run.json to stdout when done")

    search = commands.add_parser(
        "search", parents=[roles, drawing], help="find an image you have in mind, round by round"
    )
    search.add_argument("--index", type=Path, required=True, help="an indexed image folder")
    search.add_argument("--query", help="what you are looking for (asked for when missing)")
    search.add_argument("--rounds", type=int, default=10, help="at most this many rounds (default 10)")
    search.add_argument("--k", type=int, default=10, help="results shown per round (default 10)")
    search.add_argument("--feedback", choices=FEEDBACK_CHOICES, default="visual", help="what each round shows")
    search.add_argument("--resume", metavar="THREAD_ID", help="continue a session that was interrupted")
    search.add_argument("--out", type=Path, help="where round images and pages go (default runs/search-ID)")
    search.add_argument("--sessions", type=Path, help="session checkpoint database (default in ~/.local/state)")

    evaluate = commands.add_parser("eval", help="benchmark a loop")
    loops = evaluate.add_subparsers(dest="loop", required=True, metavar="LOOP")
    genir = loops.add_parser(
        "genir", parents=[roles, drawing], help="simulated-user GenIR: cumulative Hits@K per round"
    )
    genir.add_argument("--index", type=Path, required=True, help="an indexed image folder")
    genir.add_argument("--targets", type=Path, required=True, help="a folder of target images or a file of paths")
    genir.add_argument("--rounds", type=int, default=5, help="rounds per target (default 5)")
    genir.add_argument("--k", type=int, default=10, help="Hits@K cut-off (default 10)")
    genir.add_argument("--feedback", choices=FEEDBACK_CHOICES, default="visual", help="feedback kind (default visual)")
    genir.add_argument("--rank-depth", type=int, default=1000, help="ranks deeper than this count as misses")
    genir.add_argument("--concurrency", type=int, default=1, help="targets searched at once (default 1)")
    genir.add_argument("--out", type=Path, default=Path("runs/eval-genir"), help="results folder (resumable)")
    genir.add_argument("--json", action="store_true", help='print {"rounds": [{"round", "hits_at_k"}], ...} last')

    report = commands.add_parser("report", help="(re)write a run directory's report.html from its run.json")
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a directory `imageloop generate --out` wrote")

    mcp = commands.add_parser("mcp", parents=[roles], help="serve the tools to MCP clients (stdio; HTTP with --http)")
    mcp.add_argument(
        "--root", type=Path, action="append", default=[], metavar="DIR",
        help="a folder that path arguments may reach (repeatable; default: the current directory)",
    )  # fmt: skip
    mcp.add_argument("--runs", type=Path, metavar="DIR", help="runs and sessions (default FIRST_ROOT/.imageloop-runs)")
    mcp.add_argument("--http", metavar="HOST:PORT", help="serve streamable HTTP at HOST:PORT/mcp instead of stdio")
    mcp.add_argument("--token", help="bearer token HTTP clients must send beyond localhost ($IMAGELOOP_MCP_TOKEN)")
    mcp.add_argument(
        "--allow-host", action="append", default=[], metavar="NAME",
        help="a host name HTTP clients may use besides localhost and the bound address (repeatable)",
    )  # fmt: skip
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    names = [*Settings.model_fields]
    overrides = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return load_settings(args.profile, overrides)


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _index(args: argparse.Namespace) -> int:
    from imageloop.agents.captioner import VLMCaptioner
    from imageloop.backends import make_embedder, make_vlm
    from imageloop.tools.indexing.indexer import index_folder

    if args.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    if not args.folder.is_dir():
        raise ImageloopError(f"{args.folder} is not a folder")
    settings = _settings(args)
    embedder = make_embedder(settings)
    captioner: VLMCaptioner | None = None
    captioner_lock = threading.Lock()

    def caption(path: Path) -> str:
        # Built on first use: a folder whose images all have sidecar captions needs no VLM at all.
        # The indexer captions from several threads; the lock builds the VLM once.
        nonlocal captioner
        with captioner_lock:
            if captioner is None:
                captioner = VLMCaptioner(make_vlm(settings, "captioner"))
        return captioner(path)

    # Caption route: the index sees images only through captions, so every image needs one (a sidecar,
    # else the captioner, by default the VLM). Image route: captions are extras; sidecars are read and a
    # VLM is asked only when --captioner names one, since captioning a whole folder costs a model call each.
    wants_captioner = not embedder.embeds_images or settings.captioner is not None
    summary = index_folder(
        args.folder, embedder, caption if wants_captioner else None, batch_size=args.batch_size, progress=True,
        store=settings.store,
        weaviate_url=settings.weaviate_url, weaviate_api_key=settings.weaviate_api_key,
        weaviate_grpc_port=settings.weaviate_grpc_port,
    )  # fmt: skip
    for path, reason in summary.failures:
        _err(f"skipped {path}: {reason}")
    _err(f"indexed {summary.indexed}, skipped {summary.skipped}, failed {summary.failed} of {summary.total}")
    if args.json:
        print(json.dumps(summary.to_json()))
    return 0


def _index_info(args: argparse.Namespace) -> int:
    from imageloop.tools.indexing.image_index import open_index

    index = open_index(args.index)
    try:
        count = index.count()
    finally:
        index.close()
    if args.json:
        # "store" is the kind (embedded, weaviate); a Weaviate index adds its url and collection.
        info = {"count": count, "embedder": index.embedder_id, "dim": index.dim, **index.location.to_json()}
        print(json.dumps({**info, "route": index.route, "root": str(index.root)}))
    else:
        print(f"{index.root}: {count} images")
        print(f"  embedder: {index.embedder_id} ({index.dim}-d, {index.route} route)")
        print(f"  store:    {index.location.describe()}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from imageloop.runs import run_imagerag

    settings = _settings(args)

    def show(step: dict[str, Any]) -> None:
        _err(f"[{step['node']}] {step['decision']} ({step['seconds']:.2f} s)")

    record = run_imagerag(args.prompt, settings, args.index, args.out, on_step=show)  # type: ignore[arg-type]
    _err(f"{record['stop_reason']}: final image {record['final_image']}; record {args.out / 'run.json'}")
    if args.json:
        print(json.dumps(record))
    return 0


def _search(args: argparse.Namespace) -> int:
    from imageloop.search_session import run_search_session

    query = args.query
    if args.resume is None and not query:
        query = input("What are you looking for? ").strip()

    def ask(payload: dict[str, Any]) -> str:
        return input(f"{payload['ask']}\n> ")

    try:
        summary = run_search_session(
            args.index, _settings(args), args.out, query=query, rounds=args.rounds, k=args.k,
            feedback=args.feedback, resume=args.resume, ask=ask, show=print, sessions_db=args.sessions,
        )  # fmt: skip
    except (KeyboardInterrupt, EOFError):
        _err("\nimageloop: search paused; continue it with --resume (the session id is printed above)")
        return EXIT_INTERRUPTED
    print(f"{summary['stop_reason']}: {summary['found_id'] or 'not found'} after {summary['rounds_played']} round(s)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from imageloop.eval.genir import run_genir_eval

    bar = tqdm(desc="targets", unit="target", file=sys.stderr, disable=None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        summary = run_genir_eval(
            args.index, args.targets, _settings(args), args.out, rounds=args.rounds, k=args.k,
            feedback=args.feedback, rank_depth=args.rank_depth, concurrency=args.concurrency, on_target=progress,
        )  # fmt: skip
    finally:
        bar.close()
    for entry in summary["rounds"]:
        _err(f"round {entry['round']}: Hits@{summary['k']} = {entry['hits_at_k']:.3f}")
    _err(f"{summary['n_targets']} targets; dialogues in {args.out / 'dialogues.jsonl'}")
    if args.json:
        print(json.dumps({key: summary[key] for key in ("rounds", "k", "n_targets", "mean_rank")}))
    return 0


def _report(args: argparse.Namespace) -> int:
    from imageloop.report import write_report

    print(write_report(args.run_dir))
    return 0


def _mcp(args: argparse.Namespace) -> int:
    import importlib.util
    import os

    if importlib.util.find_spec("mcp") is None:
        raise ConfigError("the MCP server needs the mcp extra: pip install 'imageloop[mcp]'")
    from imageloop.mcp_server import serve

    token = args.token or os.environ.get("IMAGELOOP_MCP_TOKEN") or None
    serve(_settings(args), args.root, args.runs, http=args.http, token=token, allow_hosts=args.allow_host)
    return 0


COMMANDS = {
    "index": _index,
    "index-info": _index_info,
    "generate": _generate,
    "search": _search,
    "eval": _eval,
    "report": _report,
    "mcp": _mcp,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `imageloop` script."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ImageloopError as e:
        _err(f"imageloop: error: {e}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:
        # The indexer's interrupt says how much its committed batches saved.
        _err(f"imageloop: interrupted; {str(e) or 'finished work is saved'}, re-run to continue")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
