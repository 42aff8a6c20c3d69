"""The browser UI: one more face on the application layer (`imageloop.app.App`), on Streamlit.

`imageloop ui --index DIR` serves four tabs over one index: Generate (an ImageRAG run with its steps
streaming in, the draft beside the final image, the references with their scores, a download and the
run's report), Search (a GenIR session: each round's synthetic image and top results; say what differs
or click the one you meant), Pick (RAGE: choose the references yourself) and Compose (CIR: a reference
image plus a modification). Work runs in the background with a Stop button; the sidebar lists past runs
and searches from the runs folder (any face's), and the address names the open run or session, so a
reload keeps it. GenIR and RAGE sessions are shared with every other face (resume one started in the
terminal, and the other way round).

Parts: `server` (binding, the access token, the Streamlit app and the run files it serves), `context`
(what the page runs on), `tabs` (the page itself) and `page` (the script Streamlit runs for each browser
interaction).
"""

from imageloop.ui.server import serve

__all__ = ["serve"]
