"""Clinician review page: login, case queue, CT slice viewer with windowing and evidence overlay, decisions."""

from __future__ import annotations

import os

import numpy as np
import streamlit as st

from apps.medical import repository, service
from apps.medical.adapters import WINDOW_PRESETS, apply_window, read_record, read_series
from apps.medical.records import record_to_dict
from apps.medical.schema import CTVolume
from apps.ui_support import get_session_factory
from core.db import SuiteSettings
from core.errors import VerticalsError

OVERLAY_COLOUR = np.array([1.0, 0.15, 0.0], dtype=np.float32)


@st.cache_resource(show_spinner="Reading the CT series ...", max_entries=4)
def load_series(path: str) -> CTVolume:
    return read_series(path)


def render_slice(hu: np.ndarray, preset: str, heat: np.ndarray | None, alpha: float) -> np.ndarray:
    """(R, C) HU -> (R, C, 3) RGB in [0, 1], the evidence map blended in red where it is high."""
    gray = apply_window(hu, preset)[..., None].repeat(3, axis=-1)  # (R, C, 3)
    if heat is None:
        return gray
    weight = alpha * heat[..., None]  # (R, C, 1)
    return np.clip(gray * (1.0 - weight) + OVERLAY_COLOUR * weight, 0.0, 1.0)


settings = SuiteSettings.resolve(db=None, home=None, environ=os.environ)
st.title("Medical review")
try:
    factory = get_session_factory(settings.db_url)
except VerticalsError as e:
    st.error(str(e))
    st.stop()

if "medical_user" not in st.session_state:
    st.session_state.medical_user = None

if st.session_state.medical_user is None:
    st.caption("Sign in with a review account (`verticals medical user add NAME`, or the demo account).")
    username = st.text_input("Username", key="medical_login_username")
    password = st.text_input("Password", type="password", key="medical_login_password")
    if st.button("Sign in", key="medical_login"):
        try:
            with factory() as session:
                user = service.authenticate(session, username, password)
        except VerticalsError as e:
            st.error(str(e))
            st.stop()
        st.session_state.medical_user = {"id": user.id, "username": user.username, "role": user.role}
        st.rerun()
    st.stop()

user = st.session_state.medical_user
st.sidebar.write(f"Signed in as **{user['username']}** ({user['role']})")
if st.sidebar.button("Sign out", key="medical_logout"):
    st.session_state.medical_user = None
    st.rerun()

status = st.selectbox("Queue", ["pending", "all", "accepted", "overridden"], key="medical_status")
with factory() as session:
    cases = repository.list_cases(session, None if status == "all" else status)
if not cases:
    st.info("No cases here. Diagnose one with `verticals medical diagnose`, or run `verticals demo`.")
    st.stop()
show_pseudonym = user["role"] != "reviewer"  # reviewers see no patient identifier at all
st.dataframe(
    [
        {
            "case": c.id,
            "patient": c.patient_pseudonym[:12] if show_pseudonym else "hidden",
            "prediction": c.prediction,
            "p": round(max(c.probabilities.values()), 3),
            "status": c.status,
            "final": c.final_label or "",
            "diagnosed (UTC)": c.created_at.strftime("%Y-%m-%d %H:%M"),
        }
        for c in cases
    ],
    hide_index=True,
    key="medical_queue",
)
# The selectbox is created once, outside the search (inside it, a case other than the first created it twice).
case_id = st.selectbox("Case", [c.id for c in cases], key="medical_case")
case = next(c for c in cases if c.id == case_id)

viewer, details = st.columns([3, 2])
with viewer:
    if case.series_path is None:
        st.info("This case has no CT; the diagnosis used the record alone.")
    else:
        try:
            volume = load_series(case.series_path)
        except VerticalsError as e:
            st.error(str(e))
            st.stop()
        preset = st.selectbox("Window", list(WINDOW_PRESETS), key="medical_window")
        overlay = st.checkbox("Evidence overlay (attention)", value=True, key="medical_overlay")
        top = case.evidence.get("top_slices") or [volume.shape[0] // 2]
        index = st.slider("Slice", 0, volume.shape[0] - 1, int(top[0]), key=f"medical_slice_{case.id}")
        heat = service.evidence_overlay(case, volume.shape, volume) if overlay else None
        image = render_slice(volume.hu[index], preset, None if heat is None else heat[index], 0.45)
        st.image(image, caption=f"slice {index + 1}/{volume.shape[0]} · most attended: {top}", clamp=True)
with details:
    st.subheader(f"Model: {case.prediction}")
    st.caption(f"model {case.model_version} · config {case.config_hash} · inputs {case.input_hash[:12]}")
    st.bar_chart(case.probabilities, horizontal=True)
    st.markdown("**Record fields that drove it** (drop in probability when hidden)")
    fields = [{**f, "value": str(f["value"])} for f in case.evidence.get("record_fields", [])[:8]]
    st.dataframe(fields, hide_index=True, key="medical_fields")
    with st.expander("Record summary"):
        try:
            record = record_to_dict(read_record(case.record_path))
        except VerticalsError as e:
            st.error(str(e))
            st.stop()
        record.pop("patient_id")  # identifiers are never shown, only the pseudonym above
        st.json(record)

st.subheader("Decision")
action = st.radio("Action", ["accept", "override"], horizontal=True, key="medical_action")
labels = list(case.probabilities)
final_label = st.selectbox(
    "Final diagnosis",
    labels,
    index=labels.index(case.prediction),
    key="medical_final_label",
    disabled=action == "accept",
)
reason = st.text_area("Reason (required to override)", key="medical_reason")
if st.button("Submit decision", key="medical_submit"):
    try:
        with factory() as session, session.begin():
            reviewer = repository.get_clinician(session, user["username"])
            service.review_case(
                session,
                case_id=case.id,
                clinician=reviewer,
                action=action,
                final_label=final_label,
                reason=reason,
            )
    except VerticalsError as e:
        st.error(str(e))
        st.stop()
    st.success(f"case {case.id}: {action} recorded")

st.subheader("Audit trail")
with factory() as session:
    events = repository.list_reviews(session, case.id)
    names = repository.clinician_names(session, {e.clinician_id for e in events})
st.dataframe(
    [
        {
            "when (UTC)": e.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            "clinician": names.get(e.clinician_id, f"#{e.clinician_id}"),
            "action": e.action,
            "final": e.final_label,
            "reason": e.reason,
            "model": e.model_version,
        }
        for e in events
    ],
    hide_index=True,
    key="medical_audit",
)
