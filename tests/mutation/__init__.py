"""Mutation testing of the pure core and the journal (run ``python -m tests.mutation``)."""
