"""Education vertical: knowledge tracing, knowledge-gap recommendation and the tutor dashboard."""
