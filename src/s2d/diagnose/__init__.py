"""Diagnose: streaming activation statistics, weight spectra, PCDR and the outlier–spectrum link study.

It reads models and changes nothing.
"""

from s2d.diagnose.api import calibration_inputs, diagnose, severity
from s2d.diagnose.collect import collect
from s2d.diagnose.config import DiagnoseConfig
from s2d.diagnose.link import link_study, reading
from s2d.diagnose.spectra import PCDRAccumulator, weight_spectrum
from s2d.diagnose.stats import RunningStats, summarize

__all__ = [
    "DiagnoseConfig", "PCDRAccumulator", "RunningStats", "calibration_inputs", "collect", "diagnose",
    "link_study", "reading", "severity", "summarize", "weight_spectrum",
]
