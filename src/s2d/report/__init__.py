"""Turn a run's metrics into Markdown tables, figures and a self-contained HTML report."""

from s2d.report.markdown import fmt, md_table

__all__ = ["fmt", "md_table"]
