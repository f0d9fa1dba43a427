"""Running the CLI in-process from a test: a command that must succeed, or one that must
fail as a user error (exit 2, one `sharpscope: error:` line, no traceback)."""

from __future__ import annotations

from sharpscope.cli import main


def run_ok(capsys, argv) -> str:
    """Run a command that must succeed; return its stdout."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Traceback" not in out + err
    return out


def run_err(capsys, argv) -> str:
    """Run a command that must fail as a user error; return its one stderr line."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sharpscope: error:"), err
    return lines[0]
