"""The page: four tabs that parse what the person did, call the application layer, and draw the answer.

Streamlit runs this top to bottom on every interaction. A click (a widget callback) starts the work as a
background run of the application (`App.in_background`, as the agent faces do), so the page stays live:
its steps and denoising progress stream into a status box that polls the run, a Stop button ends it at
its next step (recorded as cancelled), and a reload finds it again. What the page shows comes from the
runs folder, the records every face writes: the sidebar lists past runs and searches, any of them
reopens, and the open run or session is named in the address (`?run=`, `?search=`, `?pick=`), so a
reload shows it again.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

import streamlit as st
from pydantic import BaseModel
from streamlit.delta_generator import DeltaGenerator

from imageloop import limits
from imageloop.app import App
from imageloop.app.jobs import Followers, Job, JobKind, job_state
from imageloop.app.results import PastWork
from imageloop.errors import ImageloopError
from imageloop.knobs import CIRKnobs, FeedbackKind, GenIRKnobs, Mode, RAGEKnobs, ReviewKind
from imageloop.tools.artifacts import ArtifactStore
from imageloop.tools.images import open_image
from imageloop.ui.context import current
from imageloop.web import run_url

COLUMNS = 5
UPLOADS = "ui-uploads"
TABS = ("Generate", "Search", "Pick", "Compose")
MODES: tuple[Mode, ...] = get_args(Mode)
FEEDBACK_KINDS: tuple[FeedbackKind, ...] = get_args(FeedbackKind)
REVIEW_KINDS: tuple[ReviewKind, ...] = get_args(ReviewKind)
POLL_S = 0.5
STEPS_SHOWN = 12
PAST_SHOWN = 30
STOPPED_HERE = "stopped from the browser UI"
# The address names what each tab shows (a reload shows it again); the tab itself is `?tab=`.
RUN, SEARCH, PICK = "run", "search", "pick"
OPENS = {"generate": ("Generate", RUN), "search": ("Search", SEARCH), "rage": ("Pick", PICK)}


# Drawing helpers.


def _image(where: DeltaGenerator, path: str | None, caption: str) -> None:
    """A picture at its own size (never stretched; larger than its column, it fits), fullscreen on click."""
    if path and Path(path).is_file():
        where.image(path, caption=caption, width="content")
    else:
        where.caption(f"{caption} (no image)")


def _grid(items: Sequence[tuple[str, str]]) -> list[DeltaGenerator]:
    """Thumbnails (path, caption) in rows of COLUMNS; returns each item's column for buttons beneath it."""
    cells: list[DeltaGenerator] = []
    for start in range(0, len(items), COLUMNS):
        row = st.columns(COLUMNS)
        for column, (path, caption) in zip(row, items[start : start + COLUMNS], strict=False):
            _image(column, path, caption)
            cells.append(column)
    return cells


def _named(hit: Mapping[str, Any]) -> str:
    """A listed image as a person reads it: its position, file name and score."""
    return f"{hit['position']}. {Path(str(hit['path'])).name} · {float(hit['score']):.3f}"


def _number(where: DeltaGenerator, label: str, name: str, value: float | None, **options: Any) -> Any:
    """A number input bounded by `imageloop.limits` (the same bounds every face shows)."""
    bound = limits.BOUNDS[name]
    kind = float if isinstance(bound.low, float) or name == "similarity_threshold" else int
    return where.number_input(
        label, min_value=kind(bound.low), max_value=kind(bound.high),
        value=None if value is None else kind(value), **options,
    )  # fmt: skip


def _download(path: str | None, name: str, key: str) -> None:
    """A button that downloads the image at `path` as `name`."""
    if path and Path(path).is_file():
        st.download_button(f"Download {name}", Path(path).read_bytes(), file_name=name, mime="image/png", key=key)


def _report_link(app: App, folder: Path) -> None:
    """A link to the run's report.html, served beside the page (relative, so it works behind a path prefix)."""
    relative = app.run_relative(folder / "report.html")
    if relative is not None and (folder / "report.html").is_file():
        st.link_button("Open the report", run_url(relative).lstrip("/"))


# Background runs: started by a click, followed by polling, stopped by a button.


def _start(key: str, kind: JobKind, play: Callable[[Followers], BaseModel], session: str | None = None) -> None:
    """Play a loop call in the background for tab `key`; a refusal (busy session, bad knob) is shown once."""
    try:
        job = current().app.in_background(kind, play, session)
    except ImageloopError as e:
        st.session_state[f"{key}_error"] = str(e)
        return
    st.session_state[f"{key}_job"] = job.id


def _followed(app: App, key: str, named: str | None, session: bool) -> Job | None:
    """The run tab `key` waits for: its own, or, after a reload, the one the address names (a run, or the run
    playing a session) while it is still going."""
    job_id = st.session_state.get(f"{key}_job")
    job = app.jobs.get(job_id) if job_id else None
    if job is None and named:
        found = app.jobs.playing(named) if session else app.jobs.get(named)
        job = found if found is not None and not found.done.is_set() else None
    return job


def _ended(app: App, key: str, named: str | None = None, *, session: bool = True) -> tuple[bool, dict[str, Any] | None]:
    """Whether tab `key` is still waiting (its progress drawn), and the result of its run once it has ended (said
    here when the run left nothing else to show: a refusal, a stop, a failure)."""
    refused = st.session_state.pop(f"{key}_error", None)
    if refused:
        st.error(refused)
    job = _followed(app, key, named, session)
    if job is None:
        return False, None
    if not job.done.is_set():
        _progress(job.id)
        return True, None
    st.session_state.pop(f"{key}_job", None)
    state = job_state(job)
    if state.result is None and state.status == "cancelled":
        st.warning(f"Stopped at a step boundary ({state.error}); what it did so far is kept.")
    elif state.result is None:
        st.error(state.error or state.status)
    return False, state.result


@st.fragment(run_every=POLL_S)
def _progress(job_id: str) -> None:
    """A running run's latest steps and progress, polled; a Stop button; the whole page again once it ends."""
    job = current().app.jobs.get(job_id)
    if job is None or job.done.is_set():
        st.rerun(scope="app")
        return
    _, notes = job.notes_since(0)
    stopping = job.cancel.is_set()
    label = "Stopping at the next step…" if stopping else f"Running {job.kind}…"
    with st.status(label, expanded=True, state="running"):
        for note in [n for n in notes if n.total is None][-STEPS_SHOWN:]:
            st.markdown(note.message)
        counted = next((n for n in reversed(notes) if n.total), None)
        if counted is not None and counted.done is not None and counted.total:
            st.progress(min(1.0, counted.done / counted.total), text=counted.message)
    st.button("Stop", key=f"stop-{job_id}", disabled=stopping, on_click=_stop, args=(job_id,))


def _stop(job_id: str) -> None:
    current().app.stop_run(job_id, STOPPED_HERE)


# Generate: ImageRAG.


def generate_tab(app: App, index: Path) -> None:
    """Prompt and knobs in; the steps as they happen; draft beside final, the references, a download, the report."""
    with st.form("generate"):
        st.text_area("Prompt", key="generate_prompt", placeholder="a blue jay on a snowy branch, ukiyo-e style")
        mode_col, iterations_col, top_k_col, threshold_col, seed_col = st.columns(5)
        mode_col.selectbox("Mode", MODES, index=MODES.index(app.settings.mode), key="generate_mode")
        settings = app.settings
        _number(iterations_col, "Max iterations", "max_iterations", settings.max_iterations, key="generate_iterations")
        _number(top_k_col, "References per concept", "top_k", settings.top_k, key="generate_top_k")
        _number(threshold_col, "Similarity threshold", "similarity_threshold", settings.similarity_threshold,
                step=0.05, key="generate_threshold")  # fmt: skip
        _number(seed_col, "Seed", "seed", settings.seed or 0, key="generate_seed")
        st.form_submit_button("Generate", type="primary", on_click=_start_generate, args=(index,))
    run = st.query_params.get(RUN)
    running, _ = _ended(app, "generate", run, session=False)
    if running:
        return
    folder = _run_folder(app, run) if run else None
    if folder is not None:
        show_run(app, app.read_run(str(folder)), folder)


def _start_generate(index: Path) -> None:
    state = st.session_state
    knobs = {
        "mode": state["generate_mode"], "max_iterations": int(state["generate_iterations"]),
        "top_k": int(state["generate_top_k"]), "seed": int(state["generate_seed"]),
        "similarity_threshold": state["generate_threshold"],
    }  # fmt: skip
    try:
        job = current().app.start_generate(str(state.get("generate_prompt") or ""), index, knobs)
    except ImageloopError as e:
        state["generate_error"] = f"Not started: {e}"
        return
    state["generate_job"] = job.id
    st.query_params[RUN] = job.id


def _run_folder(app: App, run: str) -> Path | None:
    """The folder a run named in the address stands for: a run's path under the runs folder, nothing else."""
    folder = (app.runs_dir / run).resolve()
    return folder if folder.is_relative_to(app.runs_dir) and (folder / "run.json").is_file() else None


def show_run(app: App, record: Mapping[str, Any], folder: Path) -> None:
    """An ImageRAG record: the verdict, draft and final side by side, a download, the report, every step."""
    verdict = "aligned with the prompt" if record["aligned"] else "not aligned"
    # A run is recorded from its first step: one still going (in another face) has no stop reason yet.
    stopped = f"stopped: {record['stop_reason']}" if record.get("stop_reason") else str(record.get("status"))
    st.subheader(f"{verdict} · {stopped} · {record['iterations']} regeneration(s)")
    st.caption(f"“{record.get('prompt')}” · run {folder.relative_to(app.runs_dir).as_posix()}")
    if record.get("error"):
        said = st.warning if record["stop_reason"] == "cancelled" else st.error
        said(f"{'Stopped' if record['stop_reason'] == 'cancelled' else 'Failed'}: {record['error']}")
    draft_col, final_col = st.columns(2)
    _image(draft_col, record.get("draft_image"), "Draft (the prompt alone)")
    _image(final_col, record.get("final_image"), "Final")
    with final_col:
        _download(record.get("final_image"), f"imageloop-{record['run_id']}.png", f"download-{folder.name}")
    _report_link(app, folder)
    references = record.get("references") or []
    if references:
        st.markdown("**References**")
        _grid([(ref["path"], f"{ref['concept']} · {float(ref['score']):.3f}") for ref in references])
    if record.get("missing_concepts"):
        st.caption("Missing concepts the critic named: " + ", ".join(record["missing_concepts"]))
    with st.expander(f"{len(record.get('steps') or [])} steps"):
        for step in record.get("steps") or []:
            st.markdown(f"**{step['node']}** · {step['decision']} · {step['seconds']:.2f} s")


# Search: GenIR.


def search_tab(app: App, index: Path) -> None:
    """A GenIR session: each round's drawing and results; say what differs or click the one meant."""
    running, sid, session = _shown_session(app, "search", SEARCH, app.show_search)
    if running:
        return
    if session is None or session["status"] == "finished":
        if session is not None:
            show_finished_search(session)
        start_search_form(app, index)
    elif session["status"] == "awaiting_feedback":
        show_round(session)
    else:  # a round cut off mid-way (stopped, another face, a crash): play it on
        st.info(f"Session {sid}: its last round was cut off before it showed anything.")
        st.button("Continue this session", on_click=_answer_search, args=(sid, None))


def _shown_session(
    app: App, key: str, parameter: str, show: Callable[[str], BaseModel]
) -> tuple[bool, str | None, dict[str, Any] | None]:
    """The session tab `key` shows: whether a run is still playing it (its progress drawn), its id (the address's
    `parameter`, or that of the session a run just started) and how it stands now (an unknown one is said and
    dropped from the address)."""
    sid = st.query_params.get(parameter)
    running, result = _ended(app, key, sid)
    if running:
        return True, sid, None
    if result is not None:
        sid = st.query_params[parameter] = result["session_id"]
    if not sid:
        return False, None, None
    try:
        return False, sid, show(sid).model_dump(mode="json")
    except ImageloopError as e:
        st.error(str(e))
        del st.query_params[parameter]
        return False, None, None


def start_search_form(app: App, index: Path) -> None:
    """The image a person has in mind, described; or a session started elsewhere, by id."""
    with st.form("search_start"):
        st.text_input("What are you looking for?", key="search_query")
        feedback_col, k_col, rounds_col = st.columns(3)
        feedback_col.selectbox("Each round shows", FEEDBACK_KINDS, key="search_feedback")
        _number(k_col, "Results per round", "k", app.settings.k, key="search_k")
        _number(rounds_col, "Rounds at most", "rounds", app.settings.rounds, key="search_rounds")
        st.form_submit_button("Start search", type="primary", on_click=_start_search, args=(index,))
    with st.expander("Continue a session started elsewhere (terminal, MCP, LangChain)"):
        st.text_input("Session id", key="search_open_id")
        st.button("Open", key="search_open", on_click=_open, args=("search", "search_open_id"))


def _start_search(index: Path) -> None:
    state, app = st.session_state, current().app
    knobs = GenIRKnobs.given(
        {"feedback": state["search_feedback"], "k": int(state["search_k"]), "rounds": int(state["search_rounds"])}
    )
    query = str(state.get("search_query") or "")
    _start("search", "genir", lambda follow: app.start_search(index, query, knobs=knobs, **follow))


def _answer_search(sid: str, answer: str | None) -> None:
    app = current().app
    _start("search", "genir", lambda follow: app.continue_search(sid, answer, **follow), session=sid)


def _answer_search_text(sid: str, field: str) -> None:
    _answer_search(sid, str(st.session_state.get(field, "")))


def show_round(session: Mapping[str, Any]) -> None:
    """One round: what the system understood, what it found, and the two ways to answer."""
    sid, round_ = session["session_id"], session["round"]
    st.subheader(f"Round {round_}: {session['query']}")
    st.caption(f"Session {sid} · continue it anywhere with `imageloop search --resume {sid}`")
    if session.get("synthetic_image"):
        _image(st.container(), session["synthetic_image"], "What the system understood")
    st.markdown("**Is one of these the image you mean?**")
    results = session["retrieved"]
    cells = _grid([(hit["path"], f"{_named(hit)} · {hit['caption'][:60]}") for hit in results])
    for hit, cell in zip(results, cells, strict=True):
        cell.button(
            "This one", key=f"found-{sid}-{round_}-{hit['position']}", on_click=_answer_search,
            args=(sid, f"found: {hit['position']}"),
        )  # fmt: skip
    field = f"differs-{sid}-{round_}"
    # ChatIR feedback asks the system's question; the other kinds ask what differs.
    label = session["ask"] if session.get("feedback_kind") == "chatir" else "Or: what differs from the image you want?"
    with st.form(f"feedback-{sid}-{round_}"):
        st.text_input(label, key=field)
        st.form_submit_button("Refine", on_click=_answer_search_text, args=(sid, field))
    st.button("New search", on_click=_close, args=(SEARCH,))


def show_finished_search(session: Mapping[str, Any]) -> None:
    """How a session ended: the image found, named, or the last results."""
    rounds = session["rounds_played"]
    if session.get("found_path"):
        found = Path(session["found_path"])
        st.success(f"Found after {rounds} round(s): {found.name}")
        _image(st.container(), str(found), found.name)
    else:
        st.info(f"Stopped without a find ({session['stop_reason']}) after {rounds} round(s)")


# Pick: RAGE.


def pick_tab(app: App, index: Path) -> None:
    """RAGE: retrieve candidates for a prompt, tick the ones to use (in order), generate with them as written."""
    with st.form("rage_start"):
        st.text_input("Prompt (also what is retrieved)", key="rage_prompt")
        review_col, k_col = st.columns(2)
        review_col.selectbox("Who checks each image", REVIEW_KINDS, key="rage_review")
        _number(k_col, "Candidates", "k", app.settings.k, key="rage_k")
        st.form_submit_button("Find references", type="primary", on_click=_start_rage, args=(index,))
    running, sid, session = _shown_session(app, "rage", PICK, app.show_rage)
    if running or session is None:
        return
    st.caption(f"Session {sid} · continue it anywhere with `imageloop rage --resume {sid}`")
    if session["status"] == "awaiting_selection":
        st.markdown("**Tick the references to generate with** (ticking order is the order used)")
        candidates = session["candidates"]
        cells = _grid([(hit["path"], f"{_named(hit)} · {hit['caption'][:60]}") for hit in candidates])
        for hit, cell in zip(candidates, cells, strict=True):
            cell.checkbox("Use", key=f"rage|{sid}|{hit['id']}", on_change=_tick, args=(sid, hit["id"]))
        st.button("Generate with the ticked images", type="primary", on_click=_pick, args=(sid,))
    elif session["status"] == "awaiting_review":
        _image(st.container(), session["question"].get("image"), "Does this image do?")
        for choice in ("accept", "regenerate", "reselect"):
            st.button(choice.capitalize(), key=f"review-{sid}-{choice}", on_click=_answer_rage, args=(sid, choice))
    elif session["status"] == "finished":
        _image(st.container(), session.get("final_image"), session.get("prompt") or "Generated")
        _download(session.get("final_image"), f"imageloop-rage-{sid}.png", f"download-rage-{sid}")
        _report_link(app, Path(session["out_dir"]))
        picked = session.get("selected") or []
        if picked:
            st.markdown("**Generated with**")
            _grid([(hit["path"], f"{_named(hit)} · {hit['caption'][:60]}") for hit in picked])
    else:
        st.button("Continue this session", on_click=_answer_rage, args=(sid, None))


def _start_rage(index: Path) -> None:
    state, app = st.session_state, current().app
    knobs = RAGEKnobs.given({"review": state["rage_review"], "k": int(state["rage_k"])})
    prompt = str(state.get("rage_prompt") or "")
    _start("rage", "rage", lambda follow: app.start_rage(prompt, index, knobs=knobs, **follow))


def _tick(session_id: str, candidate_id: str) -> None:
    """Keep the ticking order: the references go to the generator in the order the person picked them."""
    order = st.session_state.setdefault(f"rage-order|{session_id}", [])
    if candidate_id in order:
        order.remove(candidate_id)
    if st.session_state.get(f"rage|{session_id}|{candidate_id}"):
        order.append(candidate_id)


def _pick(sid: str) -> None:
    _answer_rage(sid, {"selected": list(st.session_state.get(f"rage-order|{sid}", []))})


def _answer_rage(sid: str, answer: Any) -> None:
    app = current().app
    _start("rage", "rage", lambda follow: app.continue_rage(sid, answer, **follow), session=sid)


# Compose: CIR.


def compose_tab(app: App, index: Path) -> None:
    """CIR: a reference image and what to change in it; the indexed images that match, best first."""
    with st.form("compose"):
        st.file_uploader("Reference image", type=["png", "jpg", "jpeg", "webp"], key="compose_upload")
        st.text_input("What should be different?", key="compose_change")
        _number(st.container(), "Results", "k", app.settings.k, key="compose_k")
        st.form_submit_button("Retrieve", type="primary", on_click=_start_compose, args=(index,))
    running, result = _ended(app, "compose", session=False)
    if running:
        return
    if result is not None:
        st.session_state["compose_results"] = result
    shown = st.session_state.get("compose_results")
    if shown:
        if shown.get("edited_description"):
            st.caption(f"Looking for: {shown['edited_description']}")
        _grid([(hit["path"], _named(hit)) for hit in shown["results"]])


def _start_compose(index: Path) -> None:
    state, app = st.session_state, current().app
    upload = state.get("compose_upload")
    if upload is None:
        state["compose_error"] = "Choose a reference image first."
        return
    try:
        reference = save_upload(app, upload.getvalue(), _browser_session())
    except ImageloopError as e:
        state["compose_error"] = str(e)
        return
    knobs, change = CIRKnobs.given({"k": int(state["compose_k"])}), str(state.get("compose_change") or "")
    _start("compose", "cir", lambda follow: app.compose_retrieve(index, reference, change, knobs=knobs, **follow))


def _browser_session() -> str:
    """This browser session's own name (its uploads are kept apart from every other session's)."""
    return str(st.session_state.setdefault("browser_session", uuid.uuid4().hex[:12]))


def save_upload(app: App, data: bytes, session: str) -> Path:
    """An uploaded image, checked like any image we open, stored by content in the browser session's own folder."""
    store = ArtifactStore(app.runs_dir / UPLOADS / session)
    store.root.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=store.root, suffix=".upload") as incoming:
        incoming.write(data)
        incoming.flush()
        return store.path(store.put(open_image(Path(incoming.name))))


# Past work, and which run or session the address names.


def _open(kind: str, field: str) -> None:
    """Open the session whose id was typed into `field`."""
    _reopen(kind, str(st.session_state.get(field, "")).strip())


def _reopen(kind: str, work_id: str) -> None:
    """Show a past run or session in its tab, named in the address (so a reload shows it again)."""
    tab, parameter = OPENS[kind]
    st.session_state["tab"] = tab
    st.query_params[parameter] = work_id


def _close(parameter: str) -> None:
    st.query_params.pop(parameter, None)


def past_work(app: App) -> None:
    """The runs and sessions any face left in the runs folder, newest first; each reopens in its tab."""
    st.markdown("**Past runs and searches**")
    work: list[PastWork] = app.history(PAST_SHOWN)
    if not work:
        st.caption("Nothing yet: runs and searches from every face appear here.")
    for item in work:
        when = time.strftime("%b %d %H:%M", time.localtime(item.updated))
        label = f"{OPENS[item.kind][0]} · {item.title[:40] or '(untitled)'} · {item.status}"
        st.button(label, key=f"past-{item.kind}-{item.id}", help=f"{when} · {item.folder}", on_click=_reopen,
                  args=(item.kind, item.id), width="stretch")  # fmt: skip


# The page.


def render() -> None:
    """The whole page: the index and past work in the sidebar, one tab per loop."""
    st.set_page_config(page_title="imageloop", layout="wide")
    context = current()
    app, index = context.app, context.index
    info = app.index_info(index)
    with st.sidebar:
        st.markdown("### imageloop")
        st.markdown(f"**Index** {Path(info['root']).name}: {info['count']} images")
        st.caption(f"`{info['root']}`  \n{info['embedder']} ({info['route']} route)")
        st.caption(f"Runs and searches are written to `{app.runs_dir}`")
        past_work(app)
    tabs = st.tabs(TABS, key="tab", bind="query-params")
    for tab, draw in zip(tabs, (generate_tab, search_tab, pick_tab, compose_tab), strict=True):
        with tab:
            try:
                draw(app, index)
            except ImageloopError as e:
                st.error(str(e))
