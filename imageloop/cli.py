"""The `imageloop` command line: parses options, calls the application layer (`imageloop.app.App`), prints.

User errors print one line (`imageloop: error: ...`) and exit 2; Ctrl-C exits 130 after saying what
was kept and how to continue. Progress goes to stderr so `--json` output on stdout stays machine-readable.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imageloop import __version__, limits
from imageloop.config import FEEDBACK_KINDS, MODES, STORE_KINDS, Settings, load_settings
from imageloop.errors import ConfigError, ImageloopError
from imageloop.progress import ProgressEvent, describe

if TYPE_CHECKING:
    from imageloop.app import App

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _size(text: str) -> tuple[int, int]:
    try:
        return limits.parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _default(name: str) -> str:
    value = limits.default(name)
    return "per backend" if value is None else f"{value:g}"


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
    group.add_argument("--seed", type=int, help=f"generator seed (default {_default('seed')})")
    group.add_argument(
        "--size", type=_size, help=f"WIDTHxHEIGHT, sides {limits.MIN_SIDE}..{limits.MAX_SIDE} (default per backend)"
    )
    group.add_argument("--steps", type=int, help="denoising steps for diffusion backends (default per backend)")
    return parent


def _genir_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("search")
    group.add_argument("--rounds", type=int, help=f"rounds at most (default {_default('rounds')})")
    group.add_argument("--k", type=int, help=f"results per round (default {_default('k')})")
    group.add_argument("--feedback", choices=FEEDBACK_KINDS, help="what each round shows (default visual)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for docs and tests)."""
    roles, drawing, genir = _role_options(), _drawing_options(), _genir_options()
    parser = argparse.ArgumentParser(
        prog="imageloop",
        description="Retrieval-augmented image generation and generative image retrieval as LangGraph loops.",
    )
    parser.add_argument("--version", action="version", version=f"imageloop {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    index = commands.add_parser("index", parents=[roles], help="index a folder of images for retrieval")
    index.add_argument("folder", type=Path, help="folder of images; the index is written to FOLDER/.imageloop")
    index.add_argument("--batch-size", type=int, help=f"images embedded per batch (default {_default('batch_size')})")
    index.add_argument("--json", action="store_true", help='print {"indexed", "skipped", "failed", "total", ...} last')
    stores = index.add_argument_group("vector store (a new index; an existing one keeps its own)")
    stores.add_argument("--store", choices=STORE_KINDS, help="default embedded: FOLDER/.imageloop")
    stores.add_argument("--weaviate-url", metavar="URL", help="e.g. http://localhost:8080 or https://ID.weaviate.cloud")
    stores.add_argument("--weaviate-api-key", metavar="KEY", help="default: WEAVIATE_API_KEY (never written to disk)")

    index_info = commands.add_parser("index-info", help="show what an index holds and what built it")
    index_info.add_argument("index", type=Path, metavar="INDEX", help="an indexed image folder (or its .imageloop)")
    index_info.add_argument("--json", action="store_true", help='print {"count", "embedder", "dim", "store"}')

    query = commands.add_parser("query", parents=[roles], help="retrieve the indexed images that match a text or image")
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

    generate = commands.add_parser("generate", parents=[roles, drawing], help="run ImageRAG for a prompt")
    generate.add_argument("prompt", nargs="?", help="what to draw (not needed with --resume)")
    generate.add_argument("--index", type=Path, help="an indexed image folder")
    generate.add_argument("--out", type=Path, help="run directory for images and run.json")
    generate.add_argument(
        "--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run from its checkpoint"
    )
    generate.add_argument("--mode", choices=MODES, help="default draft_first")
    generate.add_argument("--max-iterations", type=int, help=f"regenerations (default {_default('max_iterations')})")
    generate.add_argument("--similarity-threshold", type=float, help="drop references below this cosine")
    generate.add_argument("--top-k", type=int, help=f"references per missing concept (default {_default('top_k')})")
    generate.add_argument(
        "--max-concepts", type=int, help=f"concepts per critique (default {_default('max_concepts')})"
    )
    generate.add_argument(
        "--where", action="append", default=[], metavar="KEY=VALUE", help="retrieve only matching images"
    )
    generate.add_argument("--json", action="store_true", help="print run.json to stdout when done")

    search = commands.add_parser(
        "search", parents=[roles, drawing, genir], help="find an image you have in mind, round by round"
    )
    search.add_argument("--index", type=Path, help="an indexed image folder (not needed with --resume)")
    search.add_argument("--query", help="what you are looking for (asked for when missing)")
    search.add_argument("--resume", metavar="SESSION_ID", help="continue a session (started in any face)")
    search.add_argument("--out", type=Path, help="where round images and pages go (default runs/search-ID)")
    search.add_argument(
        "--sessions", type=Path, help="session database (default $IMAGELOOP_SESSIONS or ~/.local/state)"
    )

    evaluate = commands.add_parser("eval", help="benchmark a loop")
    loops = evaluate.add_subparsers(dest="loop", required=True, metavar="LOOP")
    genir_eval = loops.add_parser(
        "genir", parents=[roles, drawing, genir], help="simulated-user GenIR: cumulative Hits@K per round"
    )
    genir_eval.add_argument("--index", type=Path, required=True, help="an indexed image folder")
    genir_eval.add_argument("--targets", type=Path, required=True, help="a folder of target images or a file of paths")
    genir_eval.add_argument("--rank-depth", type=int, help=f"ranks deeper count as misses ({_default('rank_depth')})")
    genir_eval.add_argument("--concurrency", type=int, default=1, help="targets searched at once (default 1)")
    genir_eval.add_argument("--out", type=Path, default=Path("runs/eval-genir"), help="results folder (resumable)")
    genir_eval.add_argument("--json", action="store_true", help='print {"rounds": [{"round", "hits_at_k"}], ...} last')

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
    _add_ui_parser(commands, roles)
    _add_completion_parser(commands)
    _add_quiet(parser)
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


def _add_ui_parser(commands: Any, roles: argparse.ArgumentParser) -> None:
    ui = commands.add_parser("ui", parents=[roles], help="open the browser UI (generate, search, pick, compose)")
    ui.add_argument("--index", type=Path, required=True, help="the indexed image folder the UI searches")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    ui.add_argument(
        "--token", help="access token required beyond localhost ($IMAGELOOP_UI_TOKEN; default: a random one)"
    )
    ui.add_argument("--runs", type=Path, metavar="DIR", help="where runs and searches are written (default runs/)")
    ui.add_argument("--sessions", type=Path, help="GenIR session database (default shared with the other faces)")


def _add_completion_parser(commands: Any) -> None:
    completion = commands.add_parser("completion", help="print a shell completion script (bash or zsh)")
    completion.add_argument("shell", choices=["bash", "zsh"], help='e.g. eval "$(imageloop completion bash)"')


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    return load_settings(getattr(args, "profile", None), overrides)


def _app(args: argparse.Namespace, **options: Any) -> App:
    from imageloop.app import App

    return App(_settings(args), sessions_db=getattr(args, "sessions", None), **options)


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Progress:
    """Steps and in-node progress (denoising) on stderr: a bar at a terminal, one line per finished task in a
    log; nothing with --quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Any = None

    def step(self, step: dict[str, Any]) -> None:
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
    summary = app.index_folder(args.folder, batch_size=args.batch_size, progress=not args.quiet)
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
    for rank, r in enumerate(results):
        _err(f"{rank}. {r['path']}  ({r['score']:.3f})  {r['caption'][:80]}")
    if not results:
        _err("no indexed image matched")
    if args.json:
        print(json.dumps({"results": results}))
    return 0


def _generate(args: argparse.Namespace, app: App) -> int:
    from imageloop.app import parse_where

    if args.resume is None and (args.prompt is None or args.index is None or args.out is None):
        raise ConfigError("generate needs PROMPT, --index and --out (or --resume RUN_DIR)")
    knobs = {name: getattr(args, name) for name in ("mode", "max_iterations", "similarity_threshold", "top_k")}
    shown = _Progress(args.quiet)
    record = app.generate(
        args.prompt, args.index, out_dir=args.resume or args.out, knobs={**knobs, "max_concepts": args.max_concepts},
        where=parse_where(args.where), on_step=shown.step, on_progress=shown.progress, resume=args.resume is not None,
    )  # fmt: skip
    _err(f"{record['stop_reason']}: final image {record['final_image']}; record {args.resume or args.out}/run.json")
    if args.json:
        print(json.dumps(record))
    return 0


def _search(args: argparse.Namespace, app: App) -> int:
    given = {"feedback": args.feedback, "rounds": args.rounds, "k": args.k}
    progress = _Progress(args.quiet)
    follow = {"on_step": progress.step, "on_progress": progress.progress}
    if args.resume is not None:
        shown = app.show_search(args.resume, given=given)
        if shown["status"] == "incomplete":
            shown = app.continue_search(args.resume, None, **follow)
    else:
        if args.index is None:
            raise ConfigError("search needs --index (or --resume SESSION_ID)")
        query = args.query or input("What are you looking for? ").strip()
        shown = app.start_search(args.index, query, knobs=given, out_dir=args.out, **follow)
        print(f"session {shown['thread_id']} (continue it with --resume {shown['thread_id']})")
    while shown["status"] == "awaiting_feedback":
        _print_round(shown)
        answer = input(f"{shown['ask']}\n> ")
        try:
            shown = app.continue_search(shown["thread_id"], answer, **follow)
        except ImageloopError as e:  # an empty or unknown answer: say why and ask again
            print(f"  {e}")
    found = shown["found_id"] or "not found"
    print(f"{shown['stop_reason']}: {found} after {shown['rounds_played']} round(s)")
    return 0


def _print_round(shown: dict[str, Any]) -> None:
    print(f"\nround {shown['round']}: {shown['query']}")
    if shown["synthetic_image"]:
        print(f"  synthetic image: {shown['synthetic_image']}")
    for i, r in enumerate(shown["retrieved"]):
        print(f"  {i}. {r['path']}  ({r['score']:.3f})  id {r['id'][:12]}")
    print(f"  page: {shown['page']}")


def _eval(args: argparse.Namespace, app: App) -> int:
    from tqdm import tqdm

    bar = tqdm(desc="targets", unit="target", file=sys.stderr, disable=True if args.quiet else None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    knobs = {"feedback": args.feedback, "rounds": args.rounds, "k": args.k, "rank_depth": args.rank_depth}
    try:
        summary = app.eval_genir(
            args.index, args.targets, args.out, knobs=knobs, concurrency=args.concurrency, on_target=progress
        )
    finally:
        bar.close()
    for entry in summary["rounds"]:
        _err(f"round {entry['round']}: Hits@{summary['k']} = {entry['hits_at_k']:.3f}")
    _err(f"{summary['n_targets']} targets; dialogues in {args.out / 'dialogues.jsonl'}")
    if args.json:
        print(json.dumps({key: summary[key] for key in ("rounds", "k", "n_targets", "mean_rank")}))
    return 0


def _report(args: argparse.Namespace, app: App) -> int:
    from imageloop.report import write_report

    print(write_report(args.run_dir))
    return 0


def _mcp(args: argparse.Namespace, app: App) -> int:
    import importlib.util
    import os

    if importlib.util.find_spec("mcp") is None:
        raise ConfigError("the MCP server needs the mcp extra: pip install 'imageloop[mcp]'")
    from imageloop.mcp import serve

    token = args.token or os.environ.get("IMAGELOOP_MCP_TOKEN") or None
    serve(app, http=args.http, token=token, allow_hosts=args.allow_host)
    return 0


def _ui(args: argparse.Namespace, app: App) -> int:
    import importlib.util
    import os

    if importlib.util.find_spec("streamlit") is None:
        raise ConfigError("the browser UI needs the ui extra: pip install 'imageloop[ui]'")
    from imageloop.ui import serve

    token = args.token or os.environ.get("IMAGELOOP_UI_TOKEN") or None
    serve(app, index=args.index, host=args.host, port=args.port, token=token)
    return 0


def _ui_app(args: argparse.Namespace) -> App:
    return _app(args, runs_dir=args.runs)


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


COMMANDS: dict[str, Callable[[argparse.Namespace, App], int]] = {
    "index": _index,
    "index-info": _index_info,
    "query": _query,
    "generate": _generate,
    "search": _search,
    "eval": _eval,
    "report": _report,
    "mcp": _mcp,
    "ui": _ui,
    "completion": _completion,
}
APPS: dict[str, Callable[[argparse.Namespace], App]] = {"mcp": _mcp_app, "ui": _ui_app}


def _interrupted(args: argparse.Namespace, error: KeyboardInterrupt) -> str:
    """What Ctrl-C kept, and the command that continues from there."""
    if args.command == "index":
        return f"{str(error) or 'finished batches are saved'}; run the same command again to add the rest"
    if args.command == "generate":
        from imageloop.app.runs import can_resume

        run_dir = args.resume or args.out
        if run_dir is None or not can_resume(run_dir):
            return "nothing was run yet; run the same command again"
        return f"the run so far is in {run_dir}/run.json; continue it with: imageloop generate --resume {run_dir}"
    if args.command == "search":
        return "search paused; continue it with --resume and the session id printed above"
    if args.command == "eval":
        return f"finished targets are in {args.out}; run the same command again to evaluate the rest"
    return "stopped"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `imageloop` script."""
    args = build_parser().parse_args(argv)
    app: App | None = None
    try:
        app = APPS.get(args.command, _app)(args)
        return COMMANDS[args.command](args, app)
    except ImageloopError as e:
        _err(f"imageloop: error: {e}")
        return EXIT_USER_ERROR
    except (KeyboardInterrupt, EOFError) as e:
        _err(f"\nimageloop: interrupted; {_interrupted(args, KeyboardInterrupt(str(e)))}")
        return EXIT_INTERRUPTED
    finally:
        if app is not None:
            app.close()


if __name__ == "__main__":
    sys.exit(main())
