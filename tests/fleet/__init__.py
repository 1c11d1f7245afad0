"""The fleet run: thousands of real TokenManagers against one reference server, with time
sped up so hours pass in minutes. ``python -m tests.fleet`` (``--short`` is the CI form)."""
