"""Step 7 of the demo (data/demo.py): the dashboard on the demo's cache, served by Streamlit on localhost unless
--address says otherwise, until Ctrl-C or SIGTERM."""
from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from dashboard.serve import APP, serve_command
from data.demo import REPO_ROOT, DemoError, DemoPaths, say

def port_is_free(port: int) -> bool:
    """Whether a server could listen on `port` on every interface now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def dashboard_command(paths: DemoPaths, port: int, address: str = "localhost", read_only: bool = False,
                      compare: Path | None = None) -> list[str]:
    """`streamlit run dashboard/app.py`: on `address` only (localhost: nobody else on the network reaches it), no
    "Deploy" button (a minimal toolbar), no watching of source files (.streamlit/config.toml says why), read-only
    when asked (no tag forms, nothing written); with `compare`, a second cache for the Compare page (--fix)."""
    return serve_command(port, address, ["--cache", str(paths.cache), *(["--read-only"] if read_only else []),
                                         *(["--compare", str(compare)] if compare is not None else [])])


def step_dashboard(paths: DemoPaths, port: int, address: str = "localhost", read_only: bool = False,
                   compare: Path | None = None) -> int:
    """Serve the dashboard (`dashboard_command`) until Ctrl-C or SIGTERM; its exit code (0 when stopped)."""
    if not APP.is_file():
        raise DemoError(f"{APP} is missing: the checkout is incomplete (git status / git pull)")
    if not port_is_free(port):
        raise DemoError(f"port {port} is in use (another dashboard?): stop it, or rerun with --port N")
    shared = address not in ("localhost", "127.0.0.1", "::1")
    host = address if shared and address not in ("0.0.0.0", "::") else "localhost"
    say(f"[7/7] dashboard: open http://{host}:{port}  (Ctrl-C stops it; the cache stays in {paths.cache})"
        + (f"; it listens on {address}: others on the network can open it" if shared else "")
        + ("; read-only" if read_only else ""))
    say("        What is this model really looking at? Start with the clusters ranked most suspicious.")
    # The pages that run the model load it from the cache's manifest (its spec and --checkpoint): no variable.
    process = subprocess.Popen(dashboard_command(paths, port, address, read_only, compare), cwd=REPO_ROOT)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # a SIGTERM to the demo must not leave the dashboard running on its own

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
