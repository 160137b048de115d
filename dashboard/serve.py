"""The command line that serves the dashboard: `python -m streamlit run dashboard/app.py` with its settings, in
one place for the demo (`data/demo_dashboard.py`) and the screenshots and browser tests
(`scripts/screenshots.py`)."""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

APP = Path(__file__).with_name("app.py")
# What .streamlit/config.toml gives a server started in the repository's folder (it says why), on the command
# line so that they hold wherever the server starts; tests/test_serve_safely.py checks that the two agree.
SETTINGS = {"server.headless": "true", "server.fileWatcherType": "none", "browser.gatherUsageStats": "false",
            "client.toolbarMode": "minimal"}


def serve_command(port: int, address: str | None, app_arguments: Sequence[str], script: Path = APP) -> list[str]:
    """`streamlit run SCRIPT` on `port` and `address` (None: the one .streamlit/config.toml sets, for a server
    started in the repository's folder) with SETTINGS, then `--` and the app's own arguments."""
    return [sys.executable, "-m", "streamlit", "run", str(script), "--server.port", str(port),
            *(["--server.address", address] if address else []),
            *[part for name, value in SETTINGS.items() for part in (f"--{name}", value)],
            "--", *app_arguments]
