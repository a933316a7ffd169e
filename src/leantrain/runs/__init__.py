"""Runs: the one layer above the areas that turns a recipe into a run folder (dispatch, resume, reports)."""
