"""Tutor dashboard: class mastery heat map, a student's mastery over the prerequisite graph, gaps,
recommended exercises with reasons, what changed after the last session, and assigning exercises."""

from __future__ import annotations

import os
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

from apps.education import repository
from apps.education.adapters import read_interactions
from apps.education.graph import PrerequisiteGraph
from apps.education.predictor import KnowledgeTracer
from apps.education.service import (
    demo_paths,
    knowledge_gaps,
    load_graph,
    mastery_dot,
    recommend,
    session_change,
)
from apps.ui_support import get_session_factory
from core.db import SuiteSettings
from core.errors import VerticalsError

MAX_STUDENTS_IN_HEATMAP = 40


@st.cache_resource(show_spinner="Loading the model ...")
def load_tracer(model_dir: str) -> KnowledgeTracer:
    return KnowledgeTracer.load(model_dir)


@st.cache_resource(show_spinner=False)
def load_data(path: str) -> pd.DataFrame:
    return read_interactions(path).frame


@st.cache_resource(show_spinner=False)
def load_prerequisites(path: str, model_dir: str) -> PrerequisiteGraph | None:
    if not Path(path).is_file():
        return None
    return load_graph(path, skills=list(load_tracer(model_dir).skill_vocab_.tokens))


@st.cache_resource(show_spinner="Computing class mastery ...")
def class_mastery(model_dir: str, data_path: str) -> pd.DataFrame:
    return load_tracer(model_dir).mastery(load_data(data_path), on_unknown="unknown")


settings = SuiteSettings.resolve(db=None, home=None, environ=os.environ)
defaults = demo_paths(settings.home)
st.title("Education · tutor dashboard")
with st.expander("Model and data", expanded=False):
    model_dir = st.text_input("Model directory", str(defaults["model"]), key="edu_model_dir")
    data_path = st.text_input("Interactions (canonical CSV)", str(defaults["data"]), key="edu_data_path")
    graph_path = st.text_input("Prerequisite graph CSV", str(defaults["graph"]), key="edu_graph_path")

try:
    tracer = load_tracer(model_dir)
    frame = load_data(data_path)
    graph = load_prerequisites(graph_path, model_dir)
    overview = class_mastery(model_dir, data_path)
    factory = get_session_factory(settings.db_url)
except VerticalsError as e:
    st.error(f"{e} — run `verticals demo` to create a model and data.")
    st.stop()

names = tracer.skill_names_
st.subheader("Class overview")
shown = overview.head(MAX_STUDENTS_IN_HEATMAP)
heat = shown.reset_index().melt(id_vars="user_id", var_name="skill_id", value_name="mastery")
heat["skill"] = heat["skill_id"].map(lambda s: names.get(s, s))
st.altair_chart(
    alt.Chart(heat)
    .mark_rect()
    .encode(
        x=alt.X("user_id:N", title="student"),
        y=alt.Y("skill:N", title="skill"),
        color=alt.Color("mastery:Q", scale=alt.Scale(scheme="redyellowgreen", domain=[0, 1])),
        tooltip=["user_id", "skill", alt.Tooltip("mastery:Q", format=".0%")],
    ),
    use_container_width=True,
)
st.caption(
    f"Predicted mastery of {len(shown)} of {len(overview)} students (mean success on each skill's items)."
)

st.subheader("Student")
students = list(overview.index)
with factory() as session:
    last_assigned = repository.list_assignments(session, limit=1)
# Open on the student who was last given exercises (after `verticals demo`: one with recommendations).
opening = (
    students.index(last_assigned[0].student_id)
    if last_assigned and last_assigned[0].student_id in students
    else 0
)
student = st.selectbox("Student", students, index=opening, key="edu_student")
try:
    state = tracer.student_state(frame, student, on_unknown="unknown")
    gaps = knowledge_gaps(tracer, state, graph)
    recommendations = recommend(tracer, state, graph, k=5, gaps=gaps)
    change = session_change(tracer, frame, student)
except VerticalsError as e:
    st.error(str(e))
    st.stop()

st.graphviz_chart(mastery_dot(tracer, state.mastery, graph, highlight={g.skill_id for g in gaps}))
left, right = st.columns(2)
with left:
    st.markdown("**Recent answers**")
    recent = state.history.tail(10)[["timestamp", "item_id", "skill_id", "correct"]].iloc[::-1]
    st.dataframe(recent, hide_index=True, key="edu_recent")
with right:
    st.markdown("**What changed after the last session**")
    st.dataframe(
        change.head(6)[["skill_name", "before", "after", "change", "answers"]],
        hide_index=True,
        key="edu_change",
    )
st.markdown("**Knowledge gaps**")
if gaps:
    for gap in gaps[:5]:
        st.markdown(f"- {gap.reason}")
else:
    st.caption("No gap: every target skill and its prerequisites are mastered.")

st.markdown("**Recommended exercises**")
if not recommendations:
    st.info("No exercise fits the target band with prerequisites mastered.")
else:
    st.dataframe(
        pd.DataFrame([r.to_dict() for r in recommendations])[
            ["item_id", "skill_name", "p_correct", "reason"]
        ],
        hide_index=True,
        key="edu_recommendations",
    )
    with st.form("edu_assign_form"):
        picked = st.multiselect(
            "Exercises to assign", [r.item_id for r in recommendations], key="edu_assign_items"
        )
        tutor = st.text_input("Assigned by", key="edu_assign_tutor")
        note = st.text_input("Note (optional)", key="edu_assign_note")
        submitted = st.form_submit_button("Assign")
    if submitted:
        chosen = [r for r in recommendations if r.item_id in picked]
        try:
            if not chosen:
                st.error("Pick at least one exercise to assign.")
                st.stop()
            with factory() as session, session.begin():
                repository.add_assignments(
                    session, student, chosen, assigned_by=tutor, model_dir=model_dir, note=note
                )
        except VerticalsError as e:
            st.error(str(e))
            st.stop()
        st.success(f"Assigned {len(chosen)} exercise(s) to {student}.")

with factory() as session:
    assigned = [a.as_dict() for a in repository.list_assignments(session, student_id=student)]
st.markdown("**Assigned exercises**")
if assigned:
    st.dataframe(
        pd.DataFrame(assigned)[["created_at", "item_id", "skill_id", "assigned_by", "reason", "note"]],
        hide_index=True,
        key="edu_assigned",
    )
else:
    st.caption("Nothing assigned yet.")
