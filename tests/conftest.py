"""Test-session safety: nothing a test runs may reach beyond the loopback.

A pretrained file missing on the machine would otherwise be downloaded from
its pinned public URL (`structvpr_jax.models.weights`); the tests point the
download base at a closed loopback port instead (tests that exercise the
download serve the files from a local HTTP server on 127.0.0.1). Subprocesses
inherit the variable.
"""

import os

os.environ.setdefault("STRUCTVPR_WEIGHTS_URL", "http://127.0.0.1:9/closed")
