"""The three vertical applications and the suite entry points (CLI, Streamlit)."""
