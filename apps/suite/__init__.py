"""The suite model: one shared trunk trained jointly on the finance, medical and education tasks."""
