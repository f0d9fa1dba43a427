"""Report sections a measured study may hold besides its runs (filled in by the parts
that write them: the data-mix advisor and the Nexus diagnostics)."""

from __future__ import annotations

SECTIONS: list = []
