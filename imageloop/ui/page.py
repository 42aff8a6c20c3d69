"""The script Streamlit runs for each browser interaction: the page of `imageloop ui`."""

from imageloop.ui.tabs import render

render()
