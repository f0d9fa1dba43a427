"""Figures (matplotlib) and the self-contained HTML report."""

from .build import write_report

__all__ = ["write_report"]
