"""Home page of the suite: the registered models with their metrics, and where the suite keeps its state."""

from __future__ import annotations

import os

import streamlit as st

from apps.ui_support import get_session_factory
from core.db import SuiteSettings
from core.errors import VerticalsError
from core.orm import ModelRun
from core.repository import list_model_runs

KNOWN_APPS = ("finance", "medical", "education")
ALL_APPS = "all apps"
MAX_METRICS_SHOWN = 4


def load_runs(db_url: str) -> list[ModelRun]:
    """Registered model runs, newest first (a fresh read on every rerun: runs are added by the CLI)."""
    with get_session_factory(db_url)() as session:
        return list_model_runs(session)


def routing_chart(model_dir: str):
    """Heat map (domain x expert) of the share of each domain's routed mass of a suite model."""
    import altair as alt

    from apps.suite.routing import heatmap_rows, routing_report

    rows = heatmap_rows(routing_report(model_dir))
    return (
        alt.Chart(alt.Data(values=rows))
        .mark_rect()
        .encode(
            x=alt.X("expert:O", title="routed expert"),
            y=alt.Y("domain:N", title="domain"),
            color=alt.Color("share:Q", title="share of mass", scale=alt.Scale(scheme="blues")),
            tooltip=["domain:N", "expert:O", "group:N", alt.Tooltip("share:Q", format=".1%")],
        )
    )


def format_value(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


settings = SuiteSettings.resolve(db=None, home=None, environ=os.environ)

st.title("verticals")
st.caption(
    "One shared model core with domain-expert routing, serving fraud detection, "
    "CT-plus-record diagnosis and knowledge-gap recommendation."
)
location_home, location_db = st.columns(2)
location_home.markdown(f"**Home folder (`VERTICALS_HOME`)**  \n`{settings.home}`")
location_db.markdown(f"**Database (`VERTICALS_DB_URL`)**  \n`{settings.masked_db_url}`")

try:
    runs = load_runs(settings.db_url)
except VerticalsError as e:
    st.error(str(e))
    st.stop()

if not runs:
    st.info(
        "No models are registered yet. Run `verticals demo` to generate data and train every app's model, "
        "or train one app with `verticals <app> train` (e.g. `verticals finance train`)."
    )
    st.stop()

st.subheader("Latest model per app")
apps = [*KNOWN_APPS, *sorted({run.app for run in runs} - set(KNOWN_APPS))]
for column, app in zip(st.columns(len(apps)), apps, strict=True):
    with column:
        st.markdown(f"**{app}**")
        latest = next((run for run in runs if run.app == app), None)
        if latest is None:
            st.caption(f"No model yet: `verticals {app} train`.")
            continue
        st.caption(f"{latest.domain or 'all domains'} · {latest.created_at:%Y-%m-%d %H:%M} UTC")
        for name, value in list(latest.metrics.items())[:MAX_METRICS_SHOWN]:
            st.metric(name, format_value(value))

st.subheader("Registered model runs")
app_filter = st.selectbox("App", [ALL_APPS, *sorted({run.app for run in runs})], key="home_app_filter")
shown = [run for run in runs if app_filter in (ALL_APPS, run.app)]
st.dataframe(
    [
        {
            "app": run.app,
            "domain": run.domain or "",
            "model dir": run.model_dir,
            "metrics": run.metrics_summary(),
            "created (UTC)": run.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            "data fingerprint": run.data_fingerprint,
            "code version": run.code_version,
        }
        for run in shown
    ],
    hide_index=True,
    key="home_runs_table",
)

suite_run = next((run for run in runs if run.app == "suite"), None)
if suite_run is not None:
    st.subheader("Suite model routing")
    st.caption(
        f"`{suite_run.model_dir}`: share of each domain's routed probability mass per expert, all layers "
        "(validation data). Details: `verticals suite routing --model DIR`."
    )
    try:
        st.altair_chart(routing_chart(suite_run.model_dir), width="stretch", key="home_routing_chart")
    except VerticalsError as e:
        st.warning(str(e))
