"""The page: four tabs that parse what the person did, call one `App` method, and draw the answer.

Streamlit runs this top to bottom on every interaction. A click queues its action in the browser
session's state (a widget callback); the tab runs the queued action first, streaming the loop's steps
and progress into a status box, then draws the state it left. Long work runs in the page's own thread,
so one browser session does one thing at a time, as a person does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from imageloop import limits
from imageloop.app import App
from imageloop.app.jobs import Followers
from imageloop.errors import ImageloopError
from imageloop.graphs.steps import Step
from imageloop.knobs import FeedbackKind, Mode, ReviewKind
from imageloop.progress import ProgressEvent, describe
from imageloop.tools.artifacts import ArtifactStore
from imageloop.tools.images import open_image
from imageloop.ui.context import current

COLUMNS = 5
UPLOADS = "ui-uploads"
MODES: tuple[Mode, ...] = get_args(Mode)
FEEDBACK_KINDS: tuple[FeedbackKind, ...] = get_args(FeedbackKind)
REVIEW_KINDS: tuple[ReviewKind, ...] = get_args(ReviewKind)
Action = tuple[str, ...]


# Drawing helpers.


def _image(where: DeltaGenerator, path: str | None, caption: str) -> None:
    if path and Path(path).is_file():
        where.image(path, caption=caption, width="stretch")
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


def _follow(status: DeltaGenerator) -> Followers:
    """`on_step` and `on_progress` callbacks that stream a loop's steps and progress into `status`."""
    bar = status.empty()

    def on_step(step: Step) -> None:
        bar.empty()
        status.markdown(f"**{step['node']}** · {step['decision']} · {step['seconds']:.2f} s")

    def on_progress(event: ProgressEvent) -> None:
        total = event["total"] or 0
        bar.progress(min(1.0, event["done"] / total) if total else 0.0, text=describe(event))

    return Followers(on_step=on_step, on_progress=on_progress)


def _number(where: DeltaGenerator, label: str, name: str, value: float | None, **options: Any) -> Any:
    """A number input bounded by `imageloop.limits` (the same bounds every face shows)."""
    bound = limits.BOUNDS[name]
    kind = float if isinstance(bound.low, float) or name == "similarity_threshold" else int
    return where.number_input(
        label, min_value=kind(bound.low), max_value=kind(bound.high),
        value=None if value is None else kind(value), **options,
    )  # fmt: skip


def _queue(key: str, *action: str) -> None:
    """A click's action, run at the top of its tab on the rerun the click causes."""
    st.session_state[key] = action


def _queue_text(key: str, kind: str, target: str, field: str) -> None:
    """A submitted text field's action (the text is read from the field's widget state)."""
    st.session_state[key] = (kind, target, str(st.session_state.get(field, "")))


def _score(hit: Mapping[str, Any]) -> str:
    return f"{float(hit['score']):.3f}"


# Generate: ImageRAG.


def generate_tab(app: App, index: Path) -> None:
    """Prompt and knobs in; the steps as they happen; draft beside final; the references with their scores."""
    with st.form("generate"):
        prompt = st.text_area("Prompt", placeholder="a blue jay on a snowy branch, ukiyo-e style")
        mode_col, iterations_col, top_k_col, threshold_col, seed_col = st.columns(5)
        mode = mode_col.selectbox("Mode", MODES, index=MODES.index(app.settings.mode))
        iterations = _number(iterations_col, "Max iterations", "max_iterations", app.settings.max_iterations)
        top_k = _number(top_k_col, "References per concept", "top_k", app.settings.top_k)
        threshold = _number(
            threshold_col, "Similarity threshold", "similarity_threshold", app.settings.similarity_threshold, step=0.05
        )
        seed = _number(seed_col, "Seed", "seed", app.settings.seed or 0)
        submitted = st.form_submit_button("Generate", type="primary")
    if submitted:
        knobs = {"mode": mode, "max_iterations": int(iterations), "top_k": int(top_k), "seed": int(seed)}
        knobs["similarity_threshold"] = threshold
        with st.status("Running ImageRAG…", expanded=True) as status:
            try:
                record = app.generate(prompt, index, knobs=knobs, **_follow(status))
            except ImageloopError as e:
                status.update(label=f"Stopped: {e}", state="error")
                return
            status.update(label=f"Done: {record['stop_reason']}", state="complete", expanded=False)
        st.session_state["generate_record"] = record
    shown = st.session_state.get("generate_record")
    if shown:
        show_run(shown)


def show_run(record: Mapping[str, Any]) -> None:
    """An ImageRAG record: the verdict, draft and final side by side, the references, every step."""
    verdict = "aligned with the prompt" if record["aligned"] else "not aligned"
    st.subheader(f"{verdict} · stopped: {record['stop_reason']} · {record['iterations']} regeneration(s)")
    draft_col, final_col, _ = st.columns([1, 1, 2])
    _image(draft_col, record.get("draft_image"), "Draft (the prompt alone)")
    _image(final_col, record.get("final_image"), "Final")
    references = record.get("references") or []
    if references:
        st.markdown("**References**")
        _grid([(ref["path"], f"{ref['concept']} · {_score(ref)}") for ref in references])
    if record.get("missing_concepts"):
        st.caption("Missing concepts the critic named: " + ", ".join(record["missing_concepts"]))
    with st.expander(f"{len(record.get('steps') or [])} steps · run {record['run_id']}"):
        for step in record.get("steps") or []:
            st.markdown(f"**{step['node']}** · {step['decision']} · {step['seconds']:.2f} s")


# Search: GenIR.


def search_tab(app: App, index: Path) -> None:
    """A GenIR session: each round's synthetic image and results; say what differs or click the one meant."""
    action = st.session_state.pop("search_action", None)
    if action is not None:
        _run_search_action(app, index, action)
    session = st.session_state.get("search")
    if session is None or session["status"] == "finished":
        if session is not None:
            show_finished_search(session)
        start_search_form(app)
    elif session["status"] == "awaiting_feedback":
        show_round(session)
    else:  # a round cut off mid-way (another face, a crash): play it on
        st.button("Continue this session", on_click=_queue, args=("search_action", "open", session["session_id"]))


def _run_search_action(app: App, index: Path, action: Action) -> None:
    kind, *rest = action
    with st.status("Searching…", expanded=True) as status:
        try:
            if kind == "start":
                query, feedback, k, rounds = rest
                knobs = {"feedback": feedback, "k": int(k), "rounds": int(rounds)}
                shown = app.start_search(index, query, knobs=knobs, **_follow(status))
            elif kind == "open":
                shown = app.show_search(rest[0])
                if shown.status == "incomplete":
                    shown = app.continue_search(rest[0], None, **_follow(status))
            else:
                shown = app.continue_search(rest[0], rest[1], **_follow(status))
        except ImageloopError as e:
            status.update(label=f"Not done: {e}", state="error")
            return
        status.update(label=f"Session {shown.session_id}: {shown.status}", state="complete", expanded=False)
    st.session_state["search"] = shown.model_dump()


def start_search_form(app: App) -> None:
    """The image a person has in mind, described; or a session started elsewhere, by id."""
    with st.form("search_start"):
        st.text_input("What are you looking for?", key="search_query")
        feedback_col, k_col, rounds_col = st.columns(3)
        feedback_col.selectbox("Each round shows", FEEDBACK_KINDS, key="search_feedback")
        _number(k_col, "Results per round", "k", app.settings.k, key="search_k")
        _number(rounds_col, "Rounds at most", "rounds", app.settings.rounds, key="search_rounds")
        st.form_submit_button("Start search", type="primary", on_click=_queue_search_start)
    with st.expander("Continue a session started elsewhere (terminal, MCP, LangChain)"):
        st.text_input("Session id", key="search_open_id")
        st.button("Open", key="search_open", on_click=_queue_open)


def _queue_open() -> None:
    _queue("search_action", "open", str(st.session_state["search_open_id"]))


def _queue_search_start() -> None:
    state = st.session_state
    _queue(
        "search_action", "start", str(state["search_query"]), str(state["search_feedback"]),
        str(state["search_k"]), str(state["search_rounds"]),
    )  # fmt: skip


def show_round(session: Mapping[str, Any]) -> None:
    """One round: what the system understood, what it found, and the two ways to answer."""
    sid, round_ = session["session_id"], session["round"]
    st.subheader(f"Round {round_}: {session['query']}")
    st.caption(f"Session {sid} · continue it anywhere with `imageloop search --resume {sid}`")
    if session.get("synthetic_image"):
        drawn, _ = st.columns([1, COLUMNS - 1])
        _image(drawn, session["synthetic_image"], "What the system understood")
    st.markdown("**Is one of these the image you mean?**")
    results = session["retrieved"]
    cells = _grid([(hit["path"], f"#{hit['position']} · {_score(hit)} · {hit['caption'][:60]}") for hit in results])
    for hit, cell in zip(results, cells, strict=True):
        cell.button(
            "This one", key=f"found-{sid}-{round_}-{hit['position']}", on_click=_queue,
            args=("search_action", "answer", sid, f"found: {hit['position']}"),
        )  # fmt: skip
    field = f"differs-{sid}-{round_}"
    # ChatIR feedback asks the system's question; the other kinds ask what differs.
    label = session["ask"] if session.get("feedback_kind") == "chatir" else "Or: what differs from the image you want?"
    with st.form(f"feedback-{sid}-{round_}"):
        st.text_input(label, key=field)
        st.form_submit_button("Refine", on_click=_queue_text, args=("search_action", "answer", sid, field))
    st.button("New search", on_click=lambda: st.session_state.pop("search", None))


def show_finished_search(session: Mapping[str, Any]) -> None:
    """How a session ended: the image found, or the last results."""
    if session.get("found_path"):
        st.success(f"Found after {session['rounds_played']} round(s)")
        found, _ = st.columns([1, COLUMNS - 1])
        _image(found, session["found_path"], str(session["found_id"]))
    else:
        st.info(f"Stopped without a find ({session['stop_reason']}) after {session['rounds_played']} round(s)")


# Pick: RAGE.


def pick_tab(app: App, index: Path) -> None:
    """RAGE: retrieve candidates for a prompt, tick the ones to use (in order), generate with them as written."""
    action = st.session_state.pop("rage_action", None)
    if action is not None:
        _run_rage_action(app, index, action)
    with st.form("rage_start"):
        st.text_input("Prompt (also what is retrieved)", key="rage_prompt")
        review_col, k_col = st.columns(2)
        review_col.selectbox("Who checks each image", REVIEW_KINDS, key="rage_review")
        _number(k_col, "Candidates", "k", app.settings.k, key="rage_k")
        st.form_submit_button("Find references", type="primary", on_click=_queue_rage_start)
    session = st.session_state.get("rage")
    if session is None:
        return
    sid = session["session_id"]
    st.caption(f"Session {sid} · continue it anywhere with `imageloop rage --resume {sid}`")
    if session["status"] == "awaiting_selection":
        st.markdown("**Tick the references to generate with** (ticking order is the order used)")
        candidates = session["candidates"]
        labels = [f"{hit['position']} · {_score(hit)} · {hit['caption'][:60]}" for hit in candidates]
        cells = _grid([(hit["path"], label) for hit, label in zip(candidates, labels, strict=True)])
        for hit, cell in zip(candidates, cells, strict=True):
            cell.checkbox("Use", key=f"rage|{sid}|{hit['id']}", on_change=_tick, args=(sid, hit["id"]))
        st.button("Generate with the ticked images", type="primary", on_click=_queue, args=("rage_action", "pick", sid))
    elif session["status"] == "awaiting_review":
        image, _ = st.columns([1, 2])
        _image(image, session["question"].get("image"), "Does this image do?")
        for choice in ("accept", "regenerate", "reselect"):
            st.button(choice.capitalize(), key=f"review-{sid}-{choice}", on_click=_queue,
                      args=("rage_action", "review", sid, choice))  # fmt: skip
    elif session["status"] == "finished":
        image, _ = st.columns([1, 2])
        _image(image, session.get("final_image"), session.get("prompt") or "Generated")
        picked = session.get("selected") or []
        if picked:
            st.markdown("**Generated with**")
            _grid([(hit["path"], f"{hit['position']} · {hit['caption'][:60]}") for hit in picked])


def _queue_rage_start() -> None:
    state = st.session_state
    _queue("rage_action", "start", str(state["rage_prompt"]), str(state["rage_review"]), str(state["rage_k"]))


def _tick(session_id: str, candidate_id: str) -> None:
    """Keep the ticking order: the references go to the generator in the order the person picked them."""
    order = st.session_state.setdefault(f"rage-order|{session_id}", [])
    if candidate_id in order:
        order.remove(candidate_id)
    if st.session_state.get(f"rage|{session_id}|{candidate_id}"):
        order.append(candidate_id)


def _run_rage_action(app: App, index: Path, action: Action) -> None:
    kind, *rest = action
    with st.status("Working…", expanded=True) as status:
        try:
            if kind == "start":
                prompt, review, k = rest
                shown = app.start_rage(prompt, index, knobs={"review": review, "k": int(k)}, **_follow(status))
            elif kind == "pick":
                picked = list(st.session_state.get(f"rage-order|{rest[0]}", []))
                shown = app.continue_rage(rest[0], {"selected": picked}, **_follow(status))
            else:
                shown = app.continue_rage(rest[0], rest[1], **_follow(status))
        except ImageloopError as e:
            status.update(label=f"Not done: {e}", state="error")
            return
        status.update(label=f"Session {shown.session_id}: {shown.status}", state="complete", expanded=False)
    st.session_state["rage"] = shown.model_dump()


# Compose: CIR.


def compose_tab(app: App, index: Path) -> None:
    """CIR: a reference image and what to change in it; the indexed images that match, best first."""
    with st.form("compose"):
        upload = st.file_uploader("Reference image", type=["png", "jpg", "jpeg", "webp"])
        change = st.text_input("What should be different?")
        k = _number(st.container(), "Results", "k", app.settings.k)
        submitted = st.form_submit_button("Retrieve", type="primary")
    if submitted:
        if upload is None:
            st.error("Choose a reference image first.")
            return
        with st.status("Composing…", expanded=True) as status:
            try:
                reference = save_upload(app, upload.getvalue())
                found = app.compose_retrieve(index, reference, change, knobs={"k": int(k)}, **_follow(status))
            except ImageloopError as e:
                status.update(label=f"Not done: {e}", state="error")
                return
            status.update(label=f"{len(found.results)} results", state="complete", expanded=False)
        st.session_state["compose_results"] = found.model_dump()
    shown = st.session_state.get("compose_results")
    if shown:
        if shown.get("edited_description"):
            st.caption(f"Looking for: {shown['edited_description']}")
        _grid([(hit["path"], f"#{hit['position']} · {_score(hit)}") for hit in shown["results"]])


def save_upload(app: App, data: bytes) -> Path:
    """An uploaded image, checked like any image we open, stored by content under the runs folder."""
    store = ArtifactStore(app.runs_dir / UPLOADS)
    store.root.mkdir(parents=True, exist_ok=True)
    incoming = store.root / "incoming.bin"
    incoming.write_bytes(data)
    try:
        return store.path(store.put(open_image(incoming)))
    finally:
        incoming.unlink(missing_ok=True)


# The page.


def render() -> None:
    """The whole page: the index in the sidebar, one tab per loop."""
    st.set_page_config(page_title="imageloop", layout="wide")
    context = current()
    app, index = context.app, context.index
    info = app.index_info(index)
    with st.sidebar:
        st.markdown("### imageloop")
        st.markdown(f"**Index** {Path(info['root']).name}: {info['count']} images")
        st.caption(f"`{info['root']}`  \n{info['embedder']} ({info['route']} route)")
        st.caption(f"Runs and searches are written to `{app.runs_dir}`")
    generate, search, pick, compose = st.tabs(["Generate", "Search", "Pick", "Compose"])
    for tab, draw in ((generate, generate_tab), (search, search_tab), (pick, pick_tab), (compose, compose_tab)):
        with tab:
            try:
                draw(app, index)
            except ImageloopError as e:
                st.error(str(e))
