"""Fraud analyst dashboard: alert queue with actions, score and alert volume charts, account timeline, PR curve."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import streamlit as st

from apps.finance.predictor import FraudDetector
from apps.finance.repository import alerts_per_day, list_alerts, record_action
from apps.finance.service import account_timeline
from apps.ui_support import get_session_factory
from core.db import SuiteSettings
from core.errors import VerticalsError
from core.repository import list_model_runs
from core.train import load_metrics


@st.cache_resource(show_spinner="Loading the fraud model...")
def load_detector(model_dir: str) -> FraudDetector:
    return FraudDetector.load(model_dir)


settings = SuiteSettings.resolve(db=None, home=None, environ=os.environ)
st.title("Fraud alerts")
analyst = st.text_input("Analyst name", key="finance_analyst")

try:
    factory = get_session_factory(settings.db_url)
    with factory() as session:
        runs = [run for run in list_model_runs(session) if run.app == "finance"]
        alerts = list_alerts(session)
        daily = alerts_per_day(session)
except VerticalsError as e:
    st.error(str(e))
    st.stop()
if not runs or not alerts:
    st.info(
        "No finance model or alerts yet: run `verticals demo`, or `verticals finance train` then `score`."
    )
    st.stop()

queue = pd.DataFrame(
    {
        "alert": [a.id for a in alerts],
        "score": [round(a.score, 4) for a in alerts],
        "transaction": [a.transaction_id for a in alerts],
        "account": [a.account_id for a in alerts],
        "time (UTC)": [a.transaction_time.strftime("%Y-%m-%d %H:%M") for a in alerts],
        "amount": [a.amount for a in alerts],
        "status": [a.actions[-1].action if a.actions else "open" for a in alerts],
        "decided by": [
            f"{a.actions[-1].analyst} at {a.actions[-1].created_at:%Y-%m-%d %H:%M}" if a.actions else ""
            for a in alerts
        ],
    }
)
st.subheader("Alert queue (highest score first)")
st.dataframe(queue, hide_index=True, key="finance_queue")

labels = {a.id: f"#{a.id} · {a.score:.3f} · {a.transaction_id} · {a.account_id}" for a in alerts}
chosen = st.selectbox("Alert", list(labels), format_func=labels.get, key="finance_alert")
alert = next(a for a in alerts if a.id == chosen)
confirm, dismiss = st.columns(2)
action = None
if confirm.button("Confirm fraud", key="finance_confirm"):
    action = "confirm_fraud"
if dismiss.button("False positive", key="finance_false_positive"):
    action = "false_positive"
if action is not None:
    try:
        with factory() as session, session.begin():
            record_action(session, alert.id, action, analyst)
    except VerticalsError as e:
        st.error(str(e))
        st.stop()
    st.success(f"alert #{alert.id}: {action} recorded by {analyst.strip()}")

model_dir = runs[0].model_dir
metrics = load_metrics(model_dir)
left, right = st.columns(2)
with left:
    st.markdown("**Score distribution** (validation transactions and stored alerts)")
    alert_counts, edges = np.histogram(queue["score"], bins=20, range=(0.0, 1.0))
    validation = metrics.get("score_histogram") or [0] * len(alert_counts)
    distribution = pd.DataFrame(
        {"validation": validation, "alerts": alert_counts}, index=[f"{e:.2f}" for e in edges[:-1]]
    )
    st.bar_chart(distribution, stack=False)
with right:
    st.markdown("**Alerts per day**")
    st.bar_chart(
        pd.DataFrame([d.__dict__ for d in daily]).set_index("day")[["alerts", "confirmed", "false_positives"]]
    )

st.subheader(f"Account {alert.account_id}")
try:
    timeline, explanation = account_timeline(
        load_detector(model_dir), alert.source or "", alert.transaction_id
    )
except VerticalsError as e:
    st.error(str(e))
    st.stop()
st.scatter_chart(timeline, x="timestamp", y="amount", color="role")
st.dataframe(timeline[timeline["role"] != ""], hide_index=True, key="finance_drivers")
st.markdown("**Fields that moved the score** (score minus score without the field)")
st.dataframe(pd.DataFrame(explanation["field_effects"]), hide_index=True, key="finance_fields")

curve = metrics.get("pr_curve") or {}
if curve.get("recall"):
    st.subheader("Validation precision-recall curve")
    st.line_chart(pd.DataFrame(curve).sort_values("recall"), x="recall", y="precision")
    st.caption(
        f"average precision {metrics.get('average_precision', float('nan')):.4f} · threshold {metrics.get('threshold', float('nan')):.4f}"
    )
