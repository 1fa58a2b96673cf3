import _ref


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
