"""Experiments: the side-by-side comparison, the reproduction sweep, its figures and the
report.
"""

from __future__ import annotations

from .compare import (
    compare,
    format_table,
)
from .figures import (
    PosteriorPanel,
    plot_kl_vs_samples,
    plot_passes,
    plot_posteriors,
)
from .report import (
    Report,
)
from .reproduce import (
    measure_passes,
    posterior_kl,
    reproduce,
    select_best,
    summarize,
)
from .samples_plot import (
    plot_samples,
)
from .sweep import (
    BACKENDS,
    PROFILES,
    VARIANTS,
    Job,
    Profile,
    Variant,
    make_jobs,
    run_jobs,
)

__all__ = [
    "BACKENDS",
    "PROFILES",
    "VARIANTS",
    "Job",
    "PosteriorPanel",
    "Profile",
    "Report",
    "Variant",
    "compare",
    "format_table",
    "make_jobs",
    "measure_passes",
    "plot_kl_vs_samples",
    "plot_passes",
    "plot_posteriors",
    "plot_samples",
    "posterior_kl",
    "reproduce",
    "run_jobs",
    "select_best",
    "summarize",
]
