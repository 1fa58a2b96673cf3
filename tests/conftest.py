import _ref
import pytest


def pytest_terminal_summary(terminalreporter):
    """Print the parity errors measured in this run (they go into the issue notes)."""
    if not _ref.ERRORS:
        return
    tr = terminalreporter
    tr.section("parity against diffusers (fp32): relative L2 / max abs")
    worst_rel = max(e[1] for e in _ref.ERRORS)
    worst_abs = max(e[2] for e in _ref.ERRORS)
    for case, rel, mx in _ref.ERRORS:
        tr.write_line(f"{case:60s} rel {rel:.2e}  max {mx:.2e}")
    tr.write_line(f"{'WORST':60s} rel {worst_rel:.2e}  max {worst_abs:.2e}")


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Online mode against a Hub that refuses connections: the endpoint is pointed at a closed
    local port (real connection errors, no traffic leaves the machine)."""
    import socket

    import huggingface_hub.constants

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
