"""Draw docs/img/procedural_sources.png: the first samples of every procedural source at 32 px, seed 0,
beside the default photograph's patches (what a run with `--image SPEC` trains on first).

    PYTHONPATH=src python docs/procedural_sheet.py [OUT.png]
"""

import sys

from monossl.viz.figures import save_figure
from monossl.viz.plots import sources_figure

SPECS = ["builtin:astronaut", "procedural:fractal", "procedural:fractal:one", "procedural:fractal:100",
         "procedural:spectral", "procedural:dead-leaves", "procedural:noise"]

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "docs/img/procedural_sources.png"
    print(save_figure(sources_figure(SPECS, size=32, count=16), out, dpi=150))
