"""Report sections a measured study may hold besides its runs: the data-mix advisor and
the Nexus diagnostics. Each renders ``(html, figures)`` from STUDY/<part>/, or None when
the study has no such part."""

from __future__ import annotations

from . import mix_section, nexus_section

SECTIONS = [
    ("mix", "Data-mix advisor: relative critical sharpness", mix_section.render),
    ("nexus", "Nexus: gradient agreement and per-source minima at matched loss", nexus_section.render),
]
