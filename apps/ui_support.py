"""Helpers shared by the suite's Streamlit page scripts (home and the three apps' pages)."""

from __future__ import annotations

import streamlit as st
from sqlalchemy.orm import Session, sessionmaker

from core.db import make_engine, make_session_factory, require_current_schema


@st.cache_resource(show_spinner=False)
def get_session_factory(db_url: str) -> sessionmaker[Session]:
    """One engine per database URL for the whole server, after checking its schema is migrated.

    Raises:
        ConfigError: the database is missing or not migrated (the page shows it with `st.error`).
    """
    engine = make_engine(db_url)
    require_current_schema(engine)
    return make_session_factory(engine)
