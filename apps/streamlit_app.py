"""Streamlit entry point of the suite: the page router (``streamlit run apps/streamlit_app.py``).

The Home page is always there; each app adds its page when ``apps/<app>/ui.py`` exists. Pages read the
database URL and home folder from ``VERTICALS_DB_URL`` / ``VERTICALS_HOME`` (``verticals ui`` sets both).
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

APPS_DIR = Path(__file__).resolve().parent
APP_PAGES = {
    "finance": ("Finance", "Fraud detection", ":material/credit_card:"),
    "medical": ("Medical", "CT + record diagnosis", ":material/radiology:"),
    "education": ("Education", "Knowledge tracing", ":material/school:"),
}

# An emoji favicon is rendered locally; a :material/...: one is fetched from Google (offline: console error).
st.set_page_config(page_title="verticals", page_icon="🧭", layout="wide")

pages: dict[str, list[st.Page]] = {
    "Suite": [st.Page(APPS_DIR / "home.py", title="Home", icon=":material/home:", default=True)],
}
for name, (section, title, icon) in APP_PAGES.items():
    page_script = APPS_DIR / name / "ui.py"
    if page_script.is_file():
        pages[section] = [st.Page(page_script, title=title, icon=icon, url_path=name)]

st.navigation(pages).run()
